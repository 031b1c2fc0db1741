"""Side files travel with the weights: ``import`` keeps the HF checkpoint's tokenizer, generation config and chat
template beside the Megatron checkpoint (``iter_0000000/hf/``, named as the ``HuggingFaceTokenizer`` in the stored
args), and ``export`` without ``--hf-source`` restores them and writes the source's ``bos_token_id`` /
``eos_token_id`` into the generated ``config.json``; transformers then tokenizes, templates and generates (greedy)
exactly as with the source checkpoint.
"""

from __future__ import annotations

import filecmp
import json
import os

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from megatron_bridge_ext.testing.tiny_models import tiny_hf_model  # noqa: E402

CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
SIDE = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def _make_checkpoint(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(CONFIG["vocab_size"] - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    model = tiny_hf_model("Llama", CONFIG, seed=0)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=8,
                                                            do_sample=False)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from megatron_bridge_ext.cli.export import export_checkpoint
    from megatron_bridge_ext.cli.import_hf import import_checkpoint

    root = tmp_path_factory.mktemp("side_files")
    src, meg, out = str(root / "hf"), str(root / "megatron"), str(root / "out")
    _make_checkpoint(src)
    import_checkpoint(src, meg, tp=2)
    export_checkpoint(meg, out)
    return src, meg, out


def test_import_keeps_the_side_files_beside_the_checkpoint(converted):
    from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info

    src, meg, _ = converted
    kept = os.path.join(meg, "iter_0000000", "hf")
    for name in SIDE + ("config.json",):
        assert filecmp.cmp(os.path.join(src, name), os.path.join(kept, name), shallow=False), name
    assert not [n for n in os.listdir(kept) if n.endswith(".safetensors")]
    args = read_checkpoint_info(meg).args
    assert args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model == kept
    assert transformers.AutoTokenizer.from_pretrained(kept)("w1 w2")["input_ids"] == [4, 5]


def test_export_restores_them_and_the_special_token_ids(converted):
    src, _, out = converted
    for name in SIDE:
        assert filecmp.cmp(os.path.join(src, name), os.path.join(out, name), shallow=False), name
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_the_export_tokenizes_templates_and_generates_as_the_source(converted):
    src, _, out = converted
    text = "w5 w17 w3 w40"
    chat = [{"role": "user", "content": "w1 w2"}]
    got_tok, ref_tok = (transformers.AutoTokenizer.from_pretrained(p) for p in (out, src))
    assert got_tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert got_tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(chat, tokenize=False)
    ids = torch.tensor([ref_tok(text)["input_ids"]])
    got, ref = (transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (out, src))
    assert got.generation_config.eos_token_id == ref.generation_config.eos_token_id == 2
    with torch.no_grad():
        a = got.generate(ids, max_new_tokens=8, do_sample=False)
        b = ref.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b), (a, b)
