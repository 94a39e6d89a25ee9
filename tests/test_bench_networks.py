"""benchmarks/bench_networks.py and benchmarks/common.py on the CPU: the tiny-preset run writes complete JSON with
positive numbers, and the helpers (FLOP counting, percentiles, accuracy, peak lookup, JSON writer) are exact."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package (pytest runs with --import-mode=importlib)
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_networks as bn  # noqa: E402
from benchmarks import common  # noqa: E402


def _strict_json(path: Path):
    def no_constants(name):
        raise AssertionError(f"{path}: non-JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=no_constants)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CLI run over every network, fp32 and fp16, as CI can afford it (one CPU thread: busy shared cores)."""
    out = tmp_path_factory.mktemp("bench") / "networks.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_networks", "--preset", "tiny", "--device", "cpu",
           "--dtype", "fp32", "fp16", "--chunk", "2", "--warmup", "0", "--iters", "2", "--threads", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, _strict_json(out)


def test_tiny_cpu_run_has_machine_and_settings(tiny_run):
    proc, data = tiny_run
    assert "wrote" in proc.stdout and "unet3d_step_b1" in proc.stdout  # the summary table is printed
    m = data["machine"]
    assert m["torch"] == torch.__version__
    assert m["device"] == "cpu" and m["gpu"] is None and m["driver"] is None
    assert m["cpu"] and m["cpu_count"] >= 1
    assert len(m["source_sha256"]) == 64 and int(m["source_sha256"], 16) >= 0
    assert "commit" in m and "dirty" in m
    assert data["preset"] == "tiny" and data["chunk"] == 2 and data["resolution"] == 64
    s = data["settings"]
    assert s["dtypes"] == ["fp32", "fp16"] and s["variants"] == ["eager"] and s["iters"] == 2
    assert s["peak_fp16_tflops"] is None and "--peak-tflops" in s["peak_source"]  # no MFU on a CPU


def test_tiny_cpu_run_measures_every_network(tiny_run):
    _, data = tiny_run
    nets = data["networks"]
    assert set(nets) == set(bn.NETWORKS)
    for name, net in nets.items():
        assert "error" not in net, (name, net.get("error"))
        assert net["params"] > 0
        for case_name, case in net["cases"].items():
            assert case["flops"] > 0, case_name
            eager = case["runs"]["fp32"]["eager"]
            assert eager["iters"] == 2
            assert 0 < eager["min_ms"] <= eager["median_ms"] <= eager["p90_ms"]
            assert eager["tflops"] > 0 and eager["calls_per_s"] > 0
            assert math.isclose(eager["tflops"], case["flops"] / (eager["median_ms"] / 1e3) / 1e12, rel_tol=1e-9)
            assert eager["mfu"] is None  # no peak known for a CPU
            if case["frames"]:
                assert math.isclose(eager["frames_per_s"], case["frames"] / (eager["median_ms"] / 1e3), rel_tol=1e-9)
            else:
                assert eager["frames_per_s"] is None


def test_tiny_cpu_run_compares_fp16_with_fp32(tiny_run):
    _, data = tiny_run
    for name, net in data["networks"].items():
        for case_name, case in net["cases"].items():
            fp16 = case["runs"]["fp16"]["eager"]
            if "error" in fp16:  # a network that cannot run in fp16 is reported, not hidden
                assert "fp16_vs_fp32" not in case and fp16["error"]
                continue
            acc = case["fp16_vs_fp32"]
            # fp16 really ran (rounding shows) and stays within the tolerance of the fp32 reference
            assert acc["finite"] and 0 < acc["rel_l2_diff"] <= acc["tolerance_rel_l2"], (case_name, acc)
            assert acc["match"] is True
            assert case["fp16_speedup_vs_fp32_eager"] > 0
    assert "fp16_vs_fp32" in data["networks"]["unet3d"]["cases"]["unet3d_step_b1"]


def test_cfg_batch_nearly_doubles_the_unet_flops(tiny_run):
    _, data = tiny_run
    cases = data["networks"]["unet3d"]["cases"]
    b1, b2 = cases["unet3d_step_b1"]["flops"], cases["unet3d_step_b2_cfg"]["flops"]
    # the unconditional half skips the reference bank in its self-attention, so a bit less than twice
    assert 1.5 * b1 < b2 < 2 * b1
    assert cases["unet3d_step_b2_cfg"]["shapes"]["sample"][0] == 2


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
def test_flop_counter_counts_linear_and_cpu_attention_exactly():
    torch.manual_seed(0)
    with torch.no_grad():
        lin = torch.nn.Linear(16, 8)
        x = torch.randn(5, 16)
        with bn.flop_counter() as counter:
            lin(x)
        assert counter.get_total_flops() == 2 * 5 * 16 * 8
        q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
        with bn.flop_counter() as counter:
            F.scaled_dot_product_attention(q, k, v)
        assert counter.get_total_flops() == 4 * 1 * 2 * 8 * 6 * 4  # QK^T and PV, 2 FLOPs per multiply-add


def test_percentile_and_summary():
    assert common.percentile([4.0, 1.0, 3.0, 2.0], 90) == pytest.approx(3.7)
    assert common.percentile([5.0], 90) == 5.0
    s = common.summarise([3.0, 1.0, 2.0, 10.0])
    assert s["median_ms"] == 2.5 and s["min_ms"] == 1.0 and s["mean_ms"] == 4.0 and s["iters"] == 4
    assert s["p90_ms"] == pytest.approx(7.9)


def test_time_call_counts_calls():
    calls = []
    stats = common.time_call(lambda: calls.append(1), torch.device("cpu"), warmup=2, iters=5)
    assert len(calls) == 7 and stats["iters"] == 5 and stats["median_ms"] >= 0
    with pytest.raises(ValueError, match="iters"):
        common.time_call(lambda: None, torch.device("cpu"), iters=0)


def test_compare_reports_exact_differences():
    ref = torch.tensor([1.0, -2.0, 2.0])
    out = torch.tensor([1.0, -2.0, 2.5])
    acc = bn.compare(out, ref)
    assert acc["finite"] and acc["max_abs_diff"] == 0.5 and acc["ref_max_abs"] == 2.0
    assert acc["max_rel_diff"] == 0.25 and acc["rel_l2_diff"] == pytest.approx(0.5 / 3.0)
    assert bn.compare(torch.tensor([float("nan"), 0.0, 0.0]), ref)["finite"] is False
    assert "shape" in bn.compare(torch.zeros(2), ref)["error"]


def test_peak_and_device_tag_by_gpu_name(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert common.peak_tflops(cuda)[0] == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert common.device_tag(cuda) == "h100-80gb-hbm3"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    value, why = common.peak_tflops(cuda)
    assert value is None and "--peak-tflops" in why
    assert common.peak_tflops(cuda, 500.0) == (500.0, "command line")
    assert common.peak_tflops(torch.device("cpu"))[0] is None and common.device_tag(torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="positive"):
        common.peak_tflops(cuda, 0.0)


def test_write_json_replaces_non_finite_numbers(tmp_path):
    path = common.write_json({"a": float("nan"), "b": [1.5, float("inf")], "c": {"d": 2}}, tmp_path / "x" / "r.json")
    assert _strict_json(path) == {"a": None, "b": [1.5, None], "c": {"d": 2}}
    assert not list(path.parent.glob("*.tmp"))
    assert common.result_path("networks-tiny", torch.device("cpu"), tmp_path).name == \
        f"networks-tiny-cpu-{common.today()}.json"


@pytest.mark.parametrize("argv, message", [
    (["--networks", "unet3d,nope"], "unknown networks"),
    (["--chunk", "0"], "--chunk"),
    (["--threads", "0"], "--threads"),
])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bn.main(["--preset", "tiny", "--device", "cpu"] + argv)
    assert message in str(exc.value)
