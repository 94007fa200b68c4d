"""Caption images with a remote-code model inside its pinned environment (run as a script by
``engine.pinned``; imports only the standard library, torch, PIL and that environment's transformers).

Input: one JSON job file (argv[1]): ``model_path``, ``revision``, ``runner`` ("vision2seq" | "auto"),
``dtype``, ``load_in_4bit``, ``prompt``, ``max_new_tokens``, ``num_beams``, ``items`` (``image_id`` +
absolute ``path``). Output on stdout, one JSON object per line, flushed at once: first
``{"ready": ..., "transformers": ..., "commit": ...}``, then ``{"image_id", "text"}`` or
``{"image_id", "error"}`` per image, in order. The parent cleans the text and writes the rows; this
process writes no file, so a kill loses at most the image in flight.
"""
from __future__ import annotations

import json
import sys


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _error(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


def _load(job: dict):
    import torch
    import transformers

    dtype = getattr(torch, job["dtype"])
    kwargs = {"trust_remote_code": True, "torch_dtype": dtype}
    if job.get("revision"):
        kwargs["revision"] = job["revision"]
    cuda = torch.cuda.is_available()
    if job.get("load_in_4bit"):
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0} if cuda else {"": "cpu"}
    path, hub = job["model_path"], {k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code")}
    if job["runner"] == "vision2seq":
        auto = getattr(transformers, "AutoModelForVision2Seq", None) or transformers.AutoModelForImageTextToText
        model = auto.from_pretrained(path, **kwargs)
        parts = (transformers.AutoImageProcessor.from_pretrained(path, **hub),
                 transformers.AutoTokenizer.from_pretrained(path, **hub))
    elif job["runner"] == "auto":
        model = transformers.AutoModel.from_pretrained(path, **kwargs)
        processor = transformers.AutoProcessor.from_pretrained(path, **hub)
        parts = (processor, processor.tokenizer)
    else:
        raise ValueError(f"unknown runner {job['runner']!r}")
    if not job.get("load_in_4bit") and cuda:
        model = model.to("cuda")
    return model.eval(), parts


def _inputs(job: dict, parts: tuple, image) -> dict:
    first, tokenizer = parts
    if job["runner"] == "vision2seq":  # image processor + tokenizer, no special tokens (the model card)
        inputs = dict(first(images=[image], return_tensors="pt"))
        inputs.update(tokenizer(job["prompt"], add_special_tokens=False, return_tensors="pt"))
    else:  # the processor for the pixels; the tokenizer alone for the text (the model expands <image>)
        inputs = dict(first(text=job["prompt"], images=[image], return_tensors="pt"))
        inputs.update(tokenizer(job["prompt"], return_tensors="pt"))
    inputs.pop("token_type_ids", None)
    return inputs


def main(job_file: str) -> int:
    import torch
    import transformers
    from PIL import Image, ImageOps

    with open(job_file, encoding="utf-8") as f:
        job = json.load(f)
    model, parts = _load(job)
    tokenizer = parts[1]
    device = next(model.parameters()).device
    dtype = getattr(torch, job["dtype"])
    _emit({"ready": True, "transformers": transformers.__version__,
           "commit": getattr(model.config, "_commit_hash", None)})
    for item in job["items"]:
        try:
            with Image.open(item["path"]) as im:
                image = ImageOps.exif_transpose(im).convert("RGB")
            inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                      for k, v in _inputs(job, parts, image).items() if torch.is_tensor(v)}
            with torch.no_grad():
                out = model.generate(**inputs, do_sample=False, num_beams=job["num_beams"],
                                     max_new_tokens=job["max_new_tokens"])
            ids = inputs["input_ids"]
            if out.shape[1] >= ids.shape[1] and torch.equal(out[0, :ids.shape[1]].cpu(), ids[0].cpu()):
                out = out[:, ids.shape[1]:]  # decoder-only models return the prompt too
            _emit({"image_id": item["image_id"],
                   "text": tokenizer.decode(out[0], skip_special_tokens=True, clean_up_tokenization_spaces=False)})
        except Exception as exc:  # one bad image is a row, not the end of the run
            _emit({"image_id": item["image_id"], "error": _error(exc)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
