"""PyTorch workflows around SeparableConv2d: torch.export, ONNX, AMP, memory formats,
DistributedDataParallel, serialization. (torch.compile and opcheck: test_ops.py.)"""

import copy
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REQUIRE_ONNX
from torch import nn

import sepconv

HERE = Path(__file__).resolve().parent


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        sepconv.SeparableConv2d(3, 8, 3, padding=1, mid_activation="relu6", activation="relu",
                                depthwise_bias=True, dtype=dtype),
        sepconv.SeparableConv2d(8, 5, (3, 5), stride=2, padding=(1, 2), dilation=1,
                                depth_multiplier=2, activation="hardswish", dtype=dtype),
        sepconv.SeparableConv2d(5, 4, 2, padding="same", mid_activation="silu", dtype=dtype),
        sepconv.SeparableConv2d(4, 6, 3, padding=1, activation="relu", pointwise_groups=2,
                                channel_shuffle=2, dtype=dtype),
    ).eval()


def test_torch_export_runs_and_matches_eager():
    model, x = _model(), torch.randn(2, 3, 17, 15)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert any("sepconv.separable_conv2d" in str(n.target) for n in program.graph.nodes)
    for n in (2, 5):
        x = torch.randn(n, 3, 17, 15)
        torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_is_standard_operators_and_runs_in_onnxruntime(dynamo, tmp_path):
    if not REQUIRE_ONNX:
        for name in ("onnx", "onnxruntime", "onnxscript"):
            pytest.importorskip(name)
    import onnx
    import onnxruntime

    model, x = _model(), torch.randn(2, 3, 17, 15)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=dynamo, input_names=["x"],
                      dynamic_axes=None if dynamo else {"x": {0: "batch"}},
                      dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamo else None)
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}  # no custom domain
    ops = [n.op_type for n in graph.node]
    assert ops.count("Conv") == 8  # a grouped Conv and a 1x1 Conv per layer
    groups = [a.i for n in graph.node if n.op_type == "Conv" for a in n.attribute
              if a.name == "group"]
    assert sorted(groups) == [1, 1, 1, 2, 3, 4, 5, 8]  # (2: the grouped pointwise conv)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (2, 3):
        x = torch.randn(n, 3, 17, 15)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)


def test_cpu_autocast_bfloat16_with_grad_scaler():
    model, x = _model().train(), torch.randn(2, 3, 17, 15)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    reference = _model(torch.float64)
    reference.load_state_dict(model.state_dict())
    expected = reference(x.double())
    torch.testing.assert_close(y.double(), expected, rtol=3e-2,
                               atol=3e-2 * expected.abs().max().item())
    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(y.float().square().mean()).backward()
    for p in model.parameters():  # fp32 master weights get fp32 gradients
        assert p.grad.dtype == torch.float32 and p.grad.isfinite().all()
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    model, x = _model().cuda(), torch.randn(2, 3, 17, 15, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = model(x)
    assert y.dtype == dtype
    reference = _model(torch.float64).cuda()
    reference.load_state_dict(model.state_dict())
    expected = reference(x.double())
    torch.testing.assert_close(y.double(), expected, rtol=3e-2,
                               atol=3e-2 * expected.abs().max().item())
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_model_to_channels_last():
    model = _model().train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 17, 15).to(memory_format=torch.channels_last).requires_grad_()
    y = model(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    reference = _model()
    xr = x.detach().contiguous().requires_grad_()
    yr = reference(xr)
    assert yr.is_contiguous() and not yr.is_contiguous(memory_format=torch.channels_last)
    yr.sum().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_serialization_round_trips(tmp_path):
    model, x = _model(), torch.randn(2, 3, 17, 15)
    want = model(x)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    fresh = nn.Sequential(*(copy.deepcopy(m) for m in model))
    for p in fresh.parameters():
        nn.init.zeros_(p)
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [fresh, copy.deepcopy(model), pickle.loads(pickle.dumps(model)),
              torch.load(buffer, weights_only=False)]
    for other in copies:
        assert repr(other) == repr(model)
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)


def test_sync_batchnorm_conversion_keeps_the_module():
    model = nn.Sequential(sepconv.SeparableConv2d(3, 8, 3), nn.BatchNorm2d(8))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[0], sepconv.SeparableConv2d)
    assert isinstance(converted[1], nn.SyncBatchNorm)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(converted.eval()(x), model.eval()(x))


def test_distributed_data_parallel_matches_one_process(tmp_path):
    """2 gloo processes on the CPU, 3 SGD steps: the parameters equal those of one
    process that sees both halves of each batch (tests/ddp_worker.py)."""
    worker = subprocess.run([sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    sys.path.insert(0, str(HERE))
    try:
        from ddp_worker import make_model
    finally:
        sys.path.remove(str(HERE))
    initial = dict(make_model().named_parameters())
    for name, start in initial.items():  # parameters (buffers are per process)
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-6, atol=1e-7)
        assert not torch.equal(ddp[name], start.detach()), f"{name} did not train"
