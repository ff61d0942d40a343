"""Fetch a dataset's original files into a folder that data.py then reads (needs internet).

    python experiments/download.py amazon2014-Beauty raw/beauty
    python data.py --raw raw/beauty --out processed/beauty

NAME: amazon2014-<Category> or amazon2018-<Category> (the 5-core review file and the metadata), with
-full (amazon2014-Beauty-full) for every review, as the papers used; the Yelp Open Dataset needs its
terms accepted in a browser. A file already in the folder is kept; each is fetched under a .part
name and renamed when whole.
"""
import os
import shutil
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, or_exit  # noqa: E402

AMAZON2014 = 'http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/{}'
AMAZON2018 = 'https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2/{}/{}'


def download_urls(name):
    """The original files of a dataset name such as amazon2014-Beauty or amazon2018-All_Beauty (their
    5-core review files; with -full, such as amazon2014-Beauty-full, every review, as the papers')."""
    release, _, category = name.partition('-')
    core = '' if category.endswith('-full') else '_5'
    category = category.removesuffix('-full')
    if release == 'amazon2014' and category:
        return [AMAZON2014.format(f'reviews_{category}{core}.json.gz'),
                AMAZON2014.format(f'meta_{category}.json.gz')]
    if release == 'amazon2018' and category:
        return [AMAZON2018.format('categoryFiles' + ('Small' if core else ''), f'{category}{core}.json.gz'),
                AMAZON2018.format('metaFiles2', f'meta_{category}.json.gz')]
    if release == 'yelp':
        raise DataError('the Yelp Open Dataset needs its terms accepted in a browser: download it from '
                        'https://www.yelp.com/dataset and put yelp_academic_dataset_review.json and '
                        'yelp_academic_dataset_business.json in the folder.')
    raise DataError(f'{name}: unknown name; use amazon2014-<Category> (e.g. amazon2014-Beauty), '
                    'amazon2018-<Category> (e.g. amazon2018-All_Beauty) or yelp.')


def download(name, raw):
    os.makedirs(raw, exist_ok=True)
    for url in download_urls(name):
        path = os.path.join(raw, url.rsplit('/', 1)[1])
        if os.path.exists(path):
            print(f'{path} is already here')
            continue
        print(f'downloading {url}')
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(path + '.part', 'wb') as f:
                shutil.copyfileobj(response, f, 1 << 20)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f'cannot download {url} ({e}). Offline? Fetch the file by hand on a machine with '
                            f'internet and put it at {path}.') from e
        os.replace(path + '.part', path)


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    or_exit(download, *sys.argv[1:])
