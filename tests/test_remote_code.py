"""A saved checkpoint loads with `trust_remote_code=True` in a Python where `moco_hf` cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _reference import sgd
from _tolerance import TINY_FORWARD
from transformers import AutoModel

from moco_hf import MoCoConfig, MoCoModel

CHILD = textwrap.dedent(
    """
    import sys

    sys.modules["moco_hf"] = None  # `import moco_hf` now raises ImportError, whatever sys.path holds
    try:
        import moco_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("moco_hf is importable in the child")

    import torch
    from transformers import AutoModel, AutoModelForImageClassification

    checkpoint, inputs, results = sys.argv[1:4]
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    classifier = AutoModelForImageClassification.from_pretrained(checkpoint, trust_remote_code=True, num_labels=3)
    x = torch.load(inputs)
    with torch.no_grad():
        out = model(x)
        logits = classifier.eval()(x).logits
    torch.save(
        {
            "module": type(model).__module__,
            "classifier": type(classifier).__name__,
            "key_requires_grad": any(p.requires_grad for p in model.key_encoder.parameters()),
            "state": model.state_dict(),
            "pooler_output": out.pooler_output,
            "query_embeddings": out.query_embeddings,
            "last_hidden_state": out.last_hidden_state,
            "logits": logits,
        },
        results,
    )
    """
)


CONFIGS = {
    "v2": lambda: MoCoConfig(backbone="test_resnet", embed_dim=16, queue_size=20, momentum=0.9),
    # no queue, a prediction head, BatchNorm heads, a frozen patch projection and sin-cos positions
    "v3": lambda: MoCoConfig.v3("test_vit", backbone_kwargs={"img_size": 32}, embed_dim=16, mlp_hidden_dim=32,
                                predictor_hidden_dim=32, momentum=0.9),
}


@pytest.mark.parametrize("version", CONFIGS)
def test_trust_remote_code_without_moco_hf(tmp_path, version):
    config = CONFIGS[version]()
    model = MoCoModel(config).train()
    out = model(torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32))  # move the queue and BN statistics
    optimizer = sgd([p for p in model.parameters() if p.requires_grad], 0.1)
    out.loss.backward()
    optimizer.step()
    model.eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    assert (checkpoint / "modeling_moco.py").is_file() and (checkpoint / "configuration_moco.py").is_file()
    # save_pretrained maps the saved class only; the Hub export (moco_hf.hub) adds the classifier, as here.
    config_json = json.loads((checkpoint / "config.json").read_text())
    assert config_json["auto_map"]["AutoModel"] == "modeling_moco.MoCoModel"
    config_json["auto_map"]["AutoModelForImageClassification"] = "modeling_moco.MoCoForImageClassification"
    (checkpoint / "config.json").write_text(json.dumps(config_json))

    x = torch.randn(4, 3, 32, 32)
    torch.save(x, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(x)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_VERBOSITY="error")
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(checkpoint), str(tmp_path / "inputs.pt"), str(tmp_path / "results.pt")],
        cwd=tmp_path,  # not the repository: its moco_hf/ folder must not be found on sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-4000:]

    results = torch.load(tmp_path / "results.pt")
    assert results["module"].startswith("transformers_modules."), results["module"]
    assert results["classifier"] == "MoCoForImageClassification"
    assert results["logits"].shape == (4, 3) and torch.isfinite(results["logits"]).all()
    assert not results["key_requires_grad"]
    state = model.state_dict()
    assert results["state"].keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(results["state"][name], tensor), name
    # the same weights bit for bit; the outputs within the forward's rounding (tests/_tolerance.py), as the child
    # process may split its sums over another number of threads than this one
    for field in ("pooler_output", "query_embeddings", "last_hidden_state"):
        torch.testing.assert_close(results[field], expected[field], **TINY_FORWARD, msg=lambda m, f=field: f"{f}: {m}")

    # The same checkpoint also loads through the registered (importable) classes.
    assert type(AutoModel.from_pretrained(checkpoint)) is MoCoModel
