"""Weights out: a tiny run trained through the launcher (one rank, ZeRO-3, LoRA) is exported to a Hugging
Face-style folder; reloading it gives the training model's logits and masks, the --lora-only folder loads
with peft, and `infer` on the export reproduces evaluation's answer and masks for the same val sample."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed import run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
STEPS = 12


def _overrides(shards: Path, run_dir: Path) -> list[str]:
    return [
        f"data.train=[{{name: synthetic, path: {shards}/train}}]",
        f"data.val=[{{name: synthetic_val, path: {shards}/val}}]",
        "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0",
        f"train.output_dir={run_dir}", f"train.steps={STEPS}", f"train.save_every={STEPS}",
        "optim.lr=5e-3", "optim.warmup_steps=0", "eval.max_batches=1", "eval.max_new_tokens=12",
        "tracking.enabled=false",
    ]


def _train(overrides: list[str]) -> int:
    from launcher.config import load_config
    from launcher.train import train

    return train(load_config("configs/train/tiny.yaml", overrides))  # leaves the process group at its end


def _reference(overrides: list[str]) -> dict:
    """Rebuild the run's engine from its checkpoint (as `launcher eval` does) and record what the
    training model gives on the first val batch: LLM logits, mask logits, predict()."""
    from datapipes.loader import build_eval_loader
    from launcher import checkpoint
    from launcher.config import load_config
    from launcher.dist import identity
    from launcher.engine import build_run, render_ds_config

    cfg = load_config("configs/train/tiny.yaml", overrides)
    info = identity()
    tokenizer, model, engine = build_run(cfg, render_ds_config(cfg, info))
    checkpoint.load(engine, checkpoint.latest_complete(Path(cfg.train.output_dir) / "checkpoints"), info)
    model.eval()
    batch = next(iter(build_eval_loader(cfg.data, tokenizer, num_image_tokens=model.num_image_tokens,
                                        clip_size=cfg.model.vision.image_size, sam_size=cfg.model.pixel_encoder.image_size,
                                        rank=0, world_size=1)))
    with torch.no_grad():
        return {"batch": batch, **_outputs(model, batch, cfg.eval.max_new_tokens)}


def _outputs(model, batch, max_new_tokens: int) -> dict:
    inputs = batch.model_inputs()
    embeds = model.embed(inputs["input_ids"], model.vision(inputs["clip_pixels"]))
    logits = model.llm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
    out = model(**inputs)
    preds = model.predict(batch.prompt_ids, inputs["clip_pixels"], inputs["sam_pixels"], max_new_tokens)
    return {"logits": logits.float(), "mask_logits": [m.float() for m in out.pred_masks],
            "texts": [p.text for p in preds], "masks": [p.masks.cpu() for p in preds]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from datapipes.config import SyntheticConfig
    from datapipes.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("export")
    write_synthetic(SyntheticConfig(out_dir=str(root / "shards"), num_train=48, num_val=8, samples_per_shard=24))
    run_dir = root / "run"
    args = (_overrides(root / "shards", run_dir),)
    assert run_distributed(_train, 1, args=args, timeout=400, workdir=root / "train") == [0]
    (ref,) = run_distributed(_reference, 1, args=args, timeout=400, workdir=root / "reference")
    return root, run_dir, ref


def export_cli(*args: str) -> None:
    """The verb in its own process (it may join a one-rank process group to rebuild ZeRO-3's init)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "launcher", "export", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def merged(trained):
    root, run_dir, _ = trained
    export_cli("--run", str(run_dir), "--out", str(root / "merged"), "--max-shard-size", "200KB")
    return root / "merged"


def test_export_folder_holds_every_part_and_the_tokenizer(merged):
    from transformers import AutoTokenizer

    shards = sorted(p.name for p in (merged / "llm").glob("model-*.safetensors"))
    assert len(shards) > 1 and (merged / "llm" / "model.safetensors.index.json").is_file()  # sharded
    for part in ("vision", "sam"):
        assert (merged / part / "model.safetensors").is_file() and (merged / part / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(merged / "llm")
    for t in ("<image>", "[SEG]", "<p>", "</p>"):
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    assert "ASSISTANT" in tok.chat_template


def test_export_reloads_with_the_training_models_logits_and_masks(trained, merged, capsys):
    from launcher.export import load_export

    root, run_dir, ref = trained
    model, _, meta = load_export(merged)
    assert meta["lora"] == "merged" and meta["step"] == STEPS
    with torch.no_grad():
        got = _outputs(model, ref["batch"], 12)
    assert torch.allclose(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    assert len(got["mask_logits"]) == len(ref["mask_logits"])
    for a, b in zip(got["mask_logits"], ref["mask_logits"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert got["texts"] == ref["texts"]
    assert all(torch.equal(a, b) for a, b in zip(got["masks"], ref["masks"]))
    # negative control: the run's model before training gives other logits (the trained weights matter)
    from launcher.config import load_config
    from launcher.tokenizer import make_tokenizer
    from modeling import build_model

    cfg = load_config(run_dir / "config.yaml")
    fresh = build_model(cfg.model, make_tokenizer(cfg.model.llm)).eval()
    with torch.no_grad():
        untrained = _outputs(fresh, ref["batch"], 1)["logits"]
    assert (untrained - ref["logits"]).abs().max() > 100 * 1e-4
    # and the export holds the step asked for, or says which steps exist
    from launcher.__main__ import main

    assert main(["export", "--run", str(run_dir), "--step", "7", "--out", str(root / "never")]) == 2
    assert f"no complete checkpoint of step 7 under {run_dir / 'checkpoints'}; complete: [{STEPS}]" in capsys.readouterr().err
    import shutil

    damaged = root / "damaged_run"  # a copy whose trainable weights lost their tail after the marker was written
    shutil.copytree(run_dir, damaged)
    weights = damaged / "checkpoints" / f"step_{STEPS:08d}" / "trainable" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["export", "--run", str(damaged), "--out", str(root / "never")]) == 2
    assert f"is damaged: {weights} has" in capsys.readouterr().err


def test_lora_only_export_loads_with_peft_and_equals_the_merged_llm(trained, merged):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from launcher.export import load_export

    root, run_dir, ref = trained
    folder = root / "adapter_only"
    export_cli("--run", str(run_dir), "--out", str(folder), "--lora-only")
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    base = LlamaForCausalLM.from_pretrained(folder / "llm")
    peft_llm = PeftModel.from_pretrained(base, folder / "adapter").eval()
    merged_llm = LlamaForCausalLM.from_pretrained(merged / "llm").eval()
    ids = ref["batch"].input_ids
    with torch.no_grad():
        a = peft_llm(input_ids=ids).logits
        b = merged_llm(input_ids=ids).logits
        with peft_llm.disable_adapter():
            c = peft_llm(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert (a - c).abs().max() > 100 * 1e-4  # the adapter is trained, not an identity
    model, _, meta = load_export(folder)  # the whole model through the adapter folder
    assert meta["lora"] == "adapter"
    with torch.no_grad():
        assert torch.allclose(_outputs(model, ref["batch"], 1)["logits"], ref["logits"], rtol=1e-4, atol=1e-4)


def _val_sample(shards: Path, key: str) -> tuple[bytes, dict]:
    for tar in sorted((shards / "val").glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: m for m in tf.getmembers()}
            if f"{key}.json" in members:
                image = next(n for n in members if n.startswith(key + ".") and not n.endswith(".json"))
                return tf.extractfile(members[image]).read(), json.loads(tf.extractfile(members[f"{key}.json"]).read())
    raise KeyError(key)


def test_infer_on_the_export_reproduces_evaluations_answers_and_masks(trained, merged, tmp_path):
    from PIL import Image
    from pycocotools import mask as mask_utils

    from launcher.__main__ import main

    root, _, ref = trained
    batch = ref["batch"]
    rows = []
    for i, key in enumerate(batch.keys):
        image, sample = _val_sample(root / "shards", key)
        path = tmp_path / f"{i}.png"
        path.write_bytes(image)
        prompt = sample["conversation"][0]["content"].replace("<image>\n", "")
        # a name from user input that tries to leave --out
        rows.append({"image": path.name, "prompt": prompt, "name": f"../../{key}"})
    (tmp_path / "batch.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    assert main(["infer", "--model", str(merged), "--jsonl", str(tmp_path / "batch.jsonl"), "--out", str(out),
                 "--device", "cpu", "--max-new-tokens", "12"]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*.json") if p.parent != out) == []  # nothing outside --out
    n_masks = 0
    for i, key in enumerate(batch.keys):
        result = json.loads((out / f"{key}.json").read_text())
        assert set(result) == {"answer", "phrases", "masks"}
        assert result["answer"] == ref["texts"][i]
        h, w = Image.open(tmp_path / f"{i}.png").size[::-1]
        want = ref["masks"][i][:, :h, :w].numpy().astype(np.uint8)  # synthetic images fill the SAM frame
        got = np.stack([mask_utils.decode(r) for r in result["masks"]]) if result["masks"] else np.zeros((0, h, w), np.uint8)
        assert got.shape == want.shape and np.array_equal(got, want), key
        assert all(r["size"] == [h, w] for r in result["masks"])
        assert Image.open(out / f"{key}.png").size == (w, h)
        n_masks += len(want)
    assert n_masks > 0  # the trained model generated [SEG]s: masks were compared, not only empty lists


def test_output_stems_from_user_input_stay_inside_out(tmp_path):
    from launcher.infer import requests_from_jsonl, safe_stem

    assert safe_stem("../../etc/passwd") == "passwd"
    assert safe_stem("..") == "image" and safe_stem("a b;c") == "a_b_c" and safe_stem("/abs/.hidden") == "hidden"
    (tmp_path / "x.jsonl").write_text(json.dumps({"image": "../img.png", "prompt": "p", "name": "../../../x y"}) + "\n")
    (req,) = requests_from_jsonl(tmp_path / "x.jsonl")
    assert req.name == "x_y" and req.image == tmp_path / "../img.png"
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        requests_from_jsonl(tmp_path / "bad.jsonl")


def test_segcap_labeller_names_each_region_with_the_exported_models_answer(merged, tmp_path):
    """`data annotate --labeller segcap` over SA-1B-format files: each mask's label is what the exported model
    answers for the photo with that mask outlined (asked again here, independently of the pipeline)."""
    from PIL import Image

    from datapipes.labellers import clean_label, outlined
    from launcher.__main__ import main
    from launcher.infer import Predictor
    from launcher.labeller import QUESTION
    from test_annotate import SCENE, box_mask, write_sa1b

    src = tmp_path / "sa1b"
    src.mkdir()
    write_sa1b(src, "sa_1")
    rc = main(["data", "annotate", "--src", str(src), "--out", str(tmp_path / "out"), "--labeller", "segcap",
               "--model", str(merged), "--val-fraction", "0", "--min-shards", "1"])
    image = np.asarray(Image.open(src / "sa_1.jpg").convert("RGB"))
    predictor = Predictor(merged, "cpu", "auto", max_new_tokens=12)
    expected = []
    for _, _, *box in SCENE:
        result, _ = predictor(Image.fromarray(outlined(image, box_mask(*box))), QUESTION)
        expected.append(clean_label(result["phrases"][0] if result["phrases"] else result["answer"]))
    import sqlite3

    cached = sqlite3.connect(tmp_path / "out" / "labeller_cache.sqlite").execute("SELECT label FROM labels").fetchall()
    assert sorted(label for (label,) in cached) == sorted(expected)  # one answer per mask, the model's own
    # a tiny model may name nothing: then the image is skipped as no_label and the run says every record was bad
    assert rc == (0 if any(expected) else 2)


def test_infer_prepares_clip_input_as_the_run_trained_squash_or_llava_pad(merged):
    """The export records the run's data.clip_frame; infer feeds CLIP the same frame (LLaVA-started runs: pad)."""
    from PIL import Image

    from datapipes.collate import clip_frame, normalize_pixels, sam_frame
    from launcher.infer import Predictor

    predictor = Predictor(merged, "cpu", "auto", max_new_tokens=1)
    assert predictor.meta["clip_frame"] == "squash"  # the tiny run's default
    image = Image.fromarray((np.random.default_rng(0).random((20, 44, 3)) * 255).astype(np.uint8))
    seen = []
    hook = predictor.model.vision.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    for mode in ("squash", "pad"):
        predictor.meta["clip_frame"] = mode
        predictor(image, "What is this?")
    hook.remove()
    size, sam_size = predictor.clip_size, predictor.sam_size
    sam, hw = sam_frame(image, sam_size)
    for got, pad in zip(seen, (False, True)):
        want, _ = normalize_pixels(clip_frame(image, size, pad=pad)[None], sam[None], torch.tensor([hw]))
        assert torch.allclose(got, want.to(got.dtype))
    assert not torch.allclose(seen[0], seen[1])  # the two preprocessings differ on a non-square photo
