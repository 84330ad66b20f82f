"""AdamW inside the backward pass (`--optim_in_backward True`): no full-size gradient buffer, bf16 weights
with their fp32 masters in the optimizer state.

Plain AdamW keeps a gradient of every trained parameter until `step()`; for stage 2 at 7B that is
6.74B gradients (25 GiB in fp32), and `--trained_weights_fp32` also keeps the weights in fp32, cast to
bf16 again in every forward under autocast. Here each parameter is updated from its
post-accumulate-grad hook, as soon as autograd has finished its gradient, and the gradient is dropped
at once: only the few gradients being produced exist at any moment. The model's weights stay in the
compute dtype; a bf16 weight has an fp32 master copy in the optimizer state beside its moments
(master, exp_avg, exp_avg_sq: 12 B per parameter), so lr-sized updates are not lost to bf16 rounding,
and after each update the weight is its master rounded to bf16. An fp32 weight is its own master.

The update is torch's fused AdamW on one parameter, the kernel `torch.optim.AdamW(fused=True)` runs.
The HF Trainer drives this as an ordinary optimizer: its LR scheduler sets each group's `lr`, which the
next backward pass reads (as `step()` would have); `step()` and `zero_grad()` have nothing left to do;
`state_dict()` holds masters and moments, and `load_state_dict()` keeps them in fp32 (torch's own
casts each state tensor to its parameter's dtype, which would round the masters to bf16).

What cannot run inside the backward pass is refused by `check_optim_in_backward`.
"""

import torch
from torch.optim.adam import adam


def check_optim_in_backward(args):
    """Raise a ValueError naming the flag when `args` (TrainingArguments) ask for what the in-backward
    update cannot do."""
    if not args.optim_in_backward:
        return
    flag = "--optim_in_backward"
    if args.gradient_accumulation_steps != 1:
        raise ValueError(f"{flag} updates each weight in every backward pass: --gradient_accumulation_steps must "
                         f"be 1 (got {args.gradient_accumulation_steps}); raise the batch size instead")
    if args.max_grad_norm:
        raise ValueError(f"{flag} updates each weight before the norm of all gradients is known, so it cannot clip "
                         f"them: pass --max_grad_norm 0 (got {args.max_grad_norm})")
    if args.deepspeed:
        raise ValueError(f"{flag} is for the plain torch path: DeepSpeed runs its own optimizer (drop --deepspeed)")
    if args.world_size > 1:
        raise ValueError(f"{flag} runs in one process: under DDP the hooks would see gradients before they are "
                         f"averaged across the {args.world_size} processes")
    if args.fp16:
        raise ValueError(f"{flag} cannot skip an update on fp16 overflow (loss scaling): use --bf16")
    if args.trained_weights_fp32:
        raise ValueError(f"{flag} keeps the fp32 masters in the optimizer: drop --trained_weights_fp32")
    if args.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ValueError(f"{flag} runs AdamW: --optim {args.optim} cannot be used with it")


class InBackwardAdamW(torch.optim.Optimizer):
    """AdamW whose update of each parameter runs in that parameter's post-accumulate-grad hook.

    Call `loss.backward()` and the parameters are updated; `step()` and `zero_grad()` do nothing.
    `grad_norm()` gives the L2 norm of the gradients of the last backward pass (a tensor: no host sync).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._grad_sq = None  # sum of squared gradients since the last grad_norm()
        self._index_groups()
        self._hooks = [p.register_post_accumulate_grad_hook(self._update) for p in self._group_of]

    def _index_groups(self):
        # load_state_dict replaces the group dicts: the hooks look a parameter's group up here
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}

    @torch.no_grad()
    def _update(self, param):
        grad, param.grad = param.grad, None  # the gradient is gone once this update has read it
        group, state = self._group_of[param], self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
            if param.dtype != torch.float32:
                state["master"] = param.detach().float()
        master = state.get("master", param)
        grad_sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        self._grad_sq = grad_sq if self._grad_sq is None else self._grad_sq + grad_sq
        beta1, beta2 = group["betas"]
        adam([master], [grad.float()], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]],
             fused=True, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        if master is not param:
            param.copy_(master)  # round to the weight's dtype

    def step(self, closure=None):
        """The updates already ran in the backward pass; a closure is only evaluated (it backpropagates)."""
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none=True):
        """Nothing to clear: every gradient was dropped by its update."""

    def grad_norm(self):
        """L2 norm of the gradients seen since the last call (the last backward pass); None if none."""
        grad_sq, self._grad_sq = self._grad_sq, None
        return None if grad_sq is None else grad_sq.sqrt()

    def load_state_dict(self, state_dict):
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # the groups (lr, betas, ...); no state cast
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        self.state.clear()
        for i, param in zip(saved_ids, params):
            if i in saved:
                self.state[param] = {k: v.to(param.device) for k, v in saved[i].items()}  # dtypes kept (fp32)
        self._index_groups()
