"""The command-line converter on the gated delta-net families Qwen3-Next and Qwen3.5 as released (vision-language,
``tests/distributed/test_qwen3_5_vl.py``'s checkpoints: the vision tower and ``mtp.*`` carried; the text-only Qwen3.5
streamed import / export are ``tests/distributed/test_te_checkpoint.py``'s): ``import`` on its default
path (the stream: two local ranks, each converting a share of the tensors, no model; layout TP2 recorded) writes a
checkpoint that ``verify`` (a model at TP2 built from the stored config: every tensor and the logits of megatron's
``GatedDeltaNet`` layers against transformers') passes, and that the streamed ``export`` turns back into the source
bit for bit (the vision-language ones from the side files ``import`` kept: ``config.json`` and the carried tensors,
which ``verify`` compares too). Under megatron-core < 0.19 ``import`` refuses them by name, writing nothing."""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.io import SafeTensorsSource  # noqa: E402
from megatron_bridge_ext.launch import WorkerError  # noqa: E402
from megatron_bridge_ext.mcore.versions import (  # noqa: E402
    MEGATRON_CORE_0_19, installed_megatron_core, unmet_megatron_core,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distributed"))
import test_qwen3_5_vl  # noqa: E402
import test_qwen3_next  # noqa: E402

FAMILIES = {"Qwen3NextForCausalLM": lambda path: test_qwen3_next.make_checkpoint(path, seed=11),
            "Qwen3_5ForConditionalGeneration": lambda path: test_qwen3_5_vl.make_checkpoint(path, "dense", seed=11),
            "Qwen3_5MoeForConditionalGeneration": lambda path: test_qwen3_5_vl.make_checkpoint(path, "moe", seed=12)}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_import_verify_export(arch, tmp_path):
    from megatron_bridge_ext.cli.export import export_checkpoint
    from megatron_bridge_ext.cli.import_hf import import_checkpoint
    from megatron_bridge_ext.cli.verify import verify_checkpoint

    transformers.logging.set_verbosity_error()
    src, meg, out = str(tmp_path / "hf"), str(tmp_path / "megatron"), str(tmp_path / "out")
    FAMILIES[arch](src)
    if unmet_megatron_core(MEGATRON_CORE_0_19):
        with pytest.raises((ValueError, WorkerError), match=rf"{arch}: .*needs megatron-core >= 0\.19\.0; "
                                                            rf"megatron-core {installed_megatron_core()} is installed"):
            import_checkpoint(src, meg, tp=2, ranks=2)
        assert not os.path.exists(os.path.join(meg, "iter_0000000"))
        return
    res = import_checkpoint(src, meg, tp=2, ranks=2)
    assert res["ranks"] == 2 and "convert_s" in res and res["tensors"] > 0  # the stream's measurements
    checked = verify_checkpoint(src, meg, tp=2, batches=1)
    assert checked["ok"], checked
    assert checked["rows"]["compared"] > 0 and checked["max_logit_diff"] <= 1e-4, checked
    exported = export_checkpoint(meg, out)
    assert exported["streamed"] is True
    with SafeTensorsSource(src) as a, SafeTensorsSource(out) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        bad = [k for k in a.keys() if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        assert not bad, bad[:10]
        carried = [k for k in a.keys() if k.startswith(("model.visual.", "mtp."))]
    if arch.endswith("ForConditionalGeneration"):
        assert carried and checked["rows"]["compared"] == checked["tensors"], checked
        with open(os.path.join(src, "config.json")) as f, open(os.path.join(out, "config.json")) as g:
            assert f.read() == g.read()
