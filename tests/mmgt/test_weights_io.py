"""Checkpoint reading and strict loading: every failure is one error naming the file and the problem."""
import collections

import pytest
import torch
from torch import nn

from mmgt import weights as W


class Net(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.a = nn.Linear(3, width)
        self.b = nn.Linear(width, 2)


class Normaliser:  # stands in for the training-time object the SMGA checkpoint pickles
    def __init__(self):
        self.mean = [1.0, 2.0]


def test_read_torch_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    net = Net()
    torch.save(net.state_dict(), tmp_path / "a.pt")
    save_file(net.state_dict(), str(tmp_path / "a.safetensors"))
    for name in ("a.pt", "a.safetensors"):
        state = W.read_checkpoint(tmp_path / name)
        assert set(state) == set(net.state_dict())
        assert torch.equal(state["a.weight"], net.a.weight)


def test_foreign_objects_are_read_inert(tmp_path):
    """A checkpoint that pickles a foreign class still yields its tensors, and no code of it runs."""
    net = Net()
    torch.save({"ema_state_dict": net.state_dict(), "normalizer": Normaliser(), "epoch": 3}, tmp_path / "c.pt")
    obj = W.read_checkpoint(tmp_path / "c.pt")
    assert obj["epoch"] == 3
    assert type(obj["normalizer"]).__module__ == "mmgt.weights.inert"
    assert not isinstance(obj["normalizer"], Normaliser)
    assert torch.equal(obj["ema_state_dict"]["b.bias"], net.b.bias)


def test_lfs_pointer_truncated_empty_missing(tmp_path):
    lfs = tmp_path / "lfs.pt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(W.WeightsError, match=r"lfs\.pt.*git-lfs pointer"):
        W.read_checkpoint(lfs)
    full = tmp_path / "full.pt"
    torch.save(Net().state_dict(), full)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(W.WeightsError, match=r"cut\.pt.*truncated or corrupt"):
        W.read_checkpoint(cut)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(W.WeightsError, match=r"empty\.pt: file is empty"):
        W.read_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(W.WeightsError, match=r"absent\.pt: file not found"):
        W.read_checkpoint(tmp_path / "absent.pt")


def test_strict_load_names_keys():
    net = Net()
    state = dict(Net().state_dict())
    state.pop("a.bias")
    state["c.weight"] = torch.zeros(1)
    state["b.weight"] = torch.zeros(2, 5)
    with pytest.raises(W.WeightsError) as e:
        W.load_strict(net, state, "ck.pt", "net")
    msg = str(e.value)
    assert msg.startswith("ck.pt: does not match net: missing=1 unexpected=1 shape_mismatch=1")
    assert "a.bias" in msg and "c.weight" in msg and "b.weight model (2, 4) vs file (2, 5)" in msg


def test_remap_module_prefix():
    state = collections.OrderedDict({"module.a.weight": torch.zeros(1), "b": torch.ones(1)})
    assert list(W.remap_keys(state, W.SMGA_REMAP)) == ["a.weight", "b"]


def test_split_stage2_rejects_stray_keys():
    with pytest.raises(W.WeightsError, match=r"net\.pth: keys under no Stage II prefix.*vae\.x"):
        W.split_stage2({"pose_guider.conv_in.weight": torch.zeros(1), "vae.x": torch.zeros(1)}, "net.pth")


def test_safetensors_twin_is_preferred_while_fresh(tmp_path, caplog):
    """write_twin: read back and equal; prefer_twin / read_checkpoint take it until the pickle changes; a shared
    (tied) tensor is written too; the pickle stays."""
    net = Net()
    state = dict(net.state_dict(), tied=net.a.weight)  # shares memory with a.weight
    src = tmp_path / "ck.pt"
    torch.save({"ema_state_dict": state, "normalizer": Normaliser()}, src)
    pickled = src.read_bytes()
    twin = W.write_twin(src, W.smga_state_from_checkpoint(W.read_checkpoint(src), src), {"note": "x"})
    assert twin == tmp_path / "ck.safetensors" and src.read_bytes() == pickled
    assert W.safetensors_metadata(twin)["note"] == "x"
    assert W.prefer_twin(src) == twin
    got = W.read_checkpoint(src)  # the twin: flat tensors, no pickle read
    assert set(got) == set(state) and all(torch.equal(got[k], v) for k, v in state.items())
    # the loader of a .pt takes the twin's flat dict as it takes the pickle's nested one
    fresh = Net()
    W.load_strict(fresh, {k: v for k, v in W.smga_state_from_checkpoint(got, src).items() if k != "tied"}, "t")
    assert torch.equal(fresh.b.bias, net.b.bias)
    # meta: shapes only, from the header
    meta = W.read_checkpoint(src, meta=True)
    assert meta["a.weight"].device.type == "meta" and tuple(meta["a.weight"].shape) == (4, 3)
    # a changed pickle: the twin is stale, the pickle is read (with a warning) until converted again
    torch.save({"ema_state_dict": Net(width=5).state_dict()}, src)
    with caplog.at_level("WARNING"):
        assert W.prefer_twin(src) == src
    assert "run `engine weights convert` again" in caplog.text
    assert W.read_checkpoint(src)["ema_state_dict"]["a.weight"].shape == (5, 3)
    # the pickle removed: the twin stands for it
    src.unlink()
    assert W.prefer_twin(src) == twin


def test_twin_of_a_truncated_file_is_not_used(tmp_path):
    net = Net()
    src = tmp_path / "ck.pth"
    torch.save(net.state_dict(), src)
    twin = W.write_twin(src, net.state_dict())
    twin.write_bytes(twin.read_bytes()[:-10])
    assert W.prefer_twin(src) == src
    with pytest.raises(W.WeightsError, match=r"ck\.safetensors: not a complete safetensors file"):
        W.safetensors_metadata(twin)
