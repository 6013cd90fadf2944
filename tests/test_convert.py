"""convert_torch: converted arcface_torch weights give the same embeddings; bad inputs fail clearly, write nothing."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

torch = pytest.importorskip("torch")

from backbones import get_model
from paddle_pretrainedmodel.convert_torch import ConversionError, convert_state_dict, read_torch_state_dict
from paddle_pretrainedmodel.convert_torch import main as convert_main
from tests.conftest import ROOT
from tests.torch_reference import get_torch_model, randomize
from tests.torch_vit_reference import get_torch_vit
from tests.torch_vit_reference import randomize as randomize_vit
from utils.safe_pickle import UnsafePickleError, load_paddle_state

CONVERTER = ROOT / "paddle_pretrainedmodel" / "convert_torch.py"
TOLERANCE = 1e-4


def run_converter(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """The converter as users run it: a script, from another directory."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(CONVERTER), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def embeddings_diff(torch_model: torch.nn.Module, paddle_state: dict, name: str) -> float:
    model = get_model(name)
    model.set_state_dict(paddle_state)
    model.eval()
    x = np.random.default_rng(1).normal(size=(2, 3, 112, 112)).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    with paddle.no_grad():
        got = model(paddle.to_tensor(x)).numpy()
    assert np.abs(expected).mean() > 0.3  # embeddings of a realistic scale: the tolerance is meaningful
    return float(np.abs(got - expected).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "r18", "r50",
    # the same code path on the deep nets: ~1 min and 2 GB more, so run on demand (numbers in docs/backbones.md)
    *(pytest.param(n, marks=pytest.mark.skipif(not os.environ.get("PARITY_DEEP"), reason="set PARITY_DEEP=1"))
      for n in ("r100", "r200", "mbf_large")),
])
def test_converted_backbone_matches_torch(name: str) -> None:
    reference = randomize(get_torch_model(name), seed=3)
    state = convert_state_dict(reference.state_dict(), name)
    diff = embeddings_diff(reference, state, name)
    print(f"{name}: max |paddle - torch| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_cli_converts_checkpoint_and_embeddings_match(tmp_path: Path) -> None:
    """The CLI on an arcface_torch training checkpoint (DDP `module.` prefix, state_dict_backbone): mbf parity."""
    reference = randomize(get_torch_model("mbf"), seed=4)
    checkpoint = {"epoch": 3, "global_step": 100,
                  "state_dict_backbone": {f"module.{k}": v for k, v in reference.state_dict().items()},
                  "state_dict_softmax_fc": {"weight": torch.zeros(10, 512)}}
    torch.save(checkpoint, tmp_path / "checkpoint_gpu_0.pt")
    out = tmp_path / "backbone.pdparams"
    result = run_converter("--network", "mbf", "--input", "checkpoint_gpu_0.pt", "--output", out.name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2,059,520 parameters" in result.stdout
    assert embeddings_diff(reference, load_paddle_state(out), "mbf") <= TOLERANCE
    # paddle's own loader reads the file too (it is an ordinary .pdparams)
    assert set(paddle.load(str(out))) == set(load_paddle_state(out))


def convert_in_process(capsys: pytest.CaptureFixture, *args: str | Path) -> tuple[int, str]:
    """main() in this process (no interpreter start-up): (exit code, stderr)."""
    try:
        code = convert_main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_cli_converts_a_vit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--network vit_t` on an arcface_torch ViT state dict: the converted model gives its embeddings."""
    reference = randomize_vit(get_torch_vit("vit_t"), seed=6)
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    code, err = convert_in_process(capsys, "--network", "vit_t", "--input", tmp_path / "model.pt",
                                   "--output", tmp_path / "vit_t.pdparams")
    assert code == 0, err
    assert embeddings_diff(reference, load_paddle_state(tmp_path / "vit_t.pdparams"), "vit_t") <= TOLERANCE


def test_other_architecture_lists_keys_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save(get_torch_model("mbf").state_dict(), tmp_path / "mbf.pth")
    code, err = convert_in_process(capsys, "--network", "r18", "--input", tmp_path / "mbf.pth",
                                   "--output", tmp_path / "x.pdparams")
    assert code == 1
    assert "not an arcface_torch r18" in err and "missing: conv1.weight" in err
    assert "unexpected: layers.0.layers.0.weight" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mbf.pth"]


def test_existing_output_is_kept_without_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save(get_torch_model("mbf").state_dict(), tmp_path / "mbf.pth")
    out = tmp_path / "mbf.pdparams"
    out.write_bytes(b"precious")
    code, err = convert_in_process(capsys, "--network", "mbf", "--input", tmp_path / "mbf.pth", "--output", out)
    assert code == 1 and "exists (use --force" in err and out.read_bytes() == b"precious"
    assert convert_in_process(capsys, "--network", "mbf", "--input", tmp_path / "mbf.pth", "--output", out,
                              "--force")[0] == 0
    assert len(load_paddle_state(out)) == 283
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mbf.pdparams", "mbf.pth"]  # no temporary left


def test_shape_mismatch_is_reported() -> None:
    state = get_torch_model("r18", num_features=128).state_dict()
    expected = r"6 with wrong shape: fc.weight \[128, 25088\] \(expected \[512, 25088\]\)"
    with pytest.raises(ConversionError, match=expected):
        convert_state_dict(state, "r18")


def test_close_architecture_reports_missing_blocks() -> None:
    with pytest.raises(ConversionError, match=r"not an arcface_torch r34: \d+ missing: layer1.2.bn1.weight"):
        convert_state_dict(get_torch_model("r18").state_dict(), "r34")


def test_unknown_network(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConversionError, match="unknown network 'r51'"):
        convert_state_dict({}, "r51")
    code, err = convert_in_process(capsys, "--network", "r51", "--input", "a.pth", "--output", tmp_path / "b.pdparams")
    assert code == 2 and "invalid choice: 'r51'" in err
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_fails_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save(get_torch_model("mbf").state_dict(), tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:100_000])
    code, err = convert_in_process(capsys, "--network", "mbf", "--input", tmp_path / "cut.pth",
                                   "--output", tmp_path / "out.pdparams")
    assert code == 1 and "cut.pth: cannot read as a torch state_dict" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pth", "full.pth"]


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickles_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _RunsCode(marker)}, evil)
    with pytest.raises(ConversionError, match=r"evil\.pth: cannot read"):
        read_torch_state_dict(evil)
    evil_params = tmp_path / "evil.pdparams"
    evil_params.write_bytes(pickle.dumps({"conv1.weight": _RunsCode(marker)}))
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os)\.system"):
        load_paddle_state(evil_params)
    assert not marker.exists()


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="expected a state_dict"):
        read_torch_state_dict(tmp_path / "list.pth")
