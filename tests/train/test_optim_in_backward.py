"""`InBackwardAdamW` against torch's AdamW, its bf16 weights with fp32 masters, and the flags it refuses.

Through the Trainer (equal weights to `--optim adamw_torch_fused`, kill and resume) it is tested in
test_resume.py, beside the other kill-and-resume runs.
"""

from types import SimpleNamespace

import pytest
import torch

from flash_vstream.train.optim_in_backward import InBackwardAdamW, check_optim_in_backward
from flash_vstream.train.train import parse_args

STEPS = 5


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _groups(net):
    w1, b1, w2, b2 = net.parameters()
    return [{"params": [w1, w2], "weight_decay": 0.1}, {"params": [b1, b2], "weight_decay": 0.0}]


def _train(optimizer_cls, **kwargs):
    """STEPS steps of a small fp32 net under a warmup schedule; returns the weights and the gradients left."""
    net = _net()
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.randn(32, 4)
    optimizer = optimizer_cls(_groups(net), lr=1e-2, **kwargs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / STEPS)
    grads_left = []
    for _ in range(STEPS):
        ((net(x) - y) ** 2).mean().backward()
        grads_left.append(sum(p.grad is not None for p in net.parameters()))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return [p.detach() for p in net.parameters()], grads_left


def test_same_weights_as_torch_adamw_with_the_schedule_and_weight_decay():
    ours, left = _train(InBackwardAdamW)
    assert left == [0] * STEPS  # each gradient dropped by its own update, inside backward
    fused, _ = _train(torch.optim.AdamW, fused=True)  # the same kernel: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ours, fused))
    default, _ = _train(torch.optim.AdamW)  # the for-loop implementation rounds differently
    for a, b in zip(ours, default):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_bf16_weight_is_its_fp32_master_rounded():
    """A bf16 weight of 1.0 moves by 1e-4 per step, far under its bf16 spacing (2^-7): the master keeps every
    update, equal to fp32 AdamW on the same gradients, and the weight is the master rounded to bf16."""
    grad = torch.linspace(-1, 1, 64).bfloat16().float()  # exact in bf16: the weight's gradient is this
    weight = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    optimizer = InBackwardAdamW([weight], lr=1e-4)
    reference = torch.nn.Parameter(torch.ones(64))
    adamw = torch.optim.AdamW([reference], lr=1e-4, weight_decay=0.0, fused=True)
    for _ in range(STEPS):
        (weight.float() * grad).sum().backward()
        reference.grad = grad.clone()
        adamw.step()
    master = optimizer.state[weight]["master"]
    assert master.dtype == torch.float32 and torch.equal(master, reference.detach())
    assert torch.equal(weight.detach(), master.to(torch.bfloat16)) and not torch.equal(master, torch.ones(64))
    torch.testing.assert_close(optimizer.grad_norm(), grad.norm() * STEPS ** 0.5)
    assert optimizer.grad_norm() is None  # reset by each read

    # a reload keeps masters and moments in fp32 (torch's own load would round them to the weight's bf16)
    copy = torch.nn.Parameter(weight.detach().clone())
    reloaded = InBackwardAdamW([copy], lr=1.0)
    reloaded.load_state_dict(optimizer.state_dict())
    assert reloaded.param_groups[0]["lr"] == 1e-4
    assert all(reloaded.state[copy][k].dtype == torch.float32 for k in ("master", "exp_avg", "exp_avg_sq"))
    for param in (weight, copy):
        (param.float() * grad).sum().backward()
    assert torch.equal(optimizer.state[weight]["master"], reloaded.state[copy]["master"])
    assert torch.equal(weight, copy)


ALLOWED = dict(optim_in_backward=True, gradient_accumulation_steps=1, max_grad_norm=0.0, deepspeed=None, world_size=1,
               fp16=False, trained_weights_fp32=False, optim="adamw_torch")


@pytest.mark.parametrize("change,named", [
    ({"gradient_accumulation_steps": 4}, "--gradient_accumulation_steps must be 1"),
    ({"max_grad_norm": 1.0}, "--max_grad_norm 0"),
    ({"deepspeed": "scripts/zero1.json"}, "DeepSpeed"),
    ({"world_size": 2}, "one process"),
    ({"fp16": True}, "--bf16"),
    ({"trained_weights_fp32": True}, "drop --trained_weights_fp32"),
    ({"optim": "adafactor"}, "--optim adafactor"),
])
def test_what_cannot_run_inside_backward_is_refused(change, named):
    check_optim_in_backward(SimpleNamespace(**ALLOWED))
    check_optim_in_backward(SimpleNamespace(**{**ALLOWED, **change, "optim_in_backward": False}))
    with pytest.raises(ValueError, match=named):
        check_optim_in_backward(SimpleNamespace(**{**ALLOWED, **change}))


def test_the_default_gradient_clipping_must_be_switched_off(tmp_path):
    flags = ["--model_name_or_path", "x", "--output_dir", str(tmp_path), "--optim_in_backward", "True"]
    _, _, args = parse_args(flags)
    with pytest.raises(ValueError, match="--max_grad_norm 0"):
        check_optim_in_backward(args)
    _, _, args = parse_args(flags + ["--max_grad_norm", "0"])
    check_optim_in_backward(args)
