"""`VStreamTrainer`: HF `Trainer` plus a modality-grouped length sampler, the stage-1 adapter save,
and checkpoints that a kill never leaves half written (see `checkpointing`)."""

import os
import shutil

import torch
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..model.builder import ADAPTER_FILE, ADAPTER_PREFIXES
from ..utils.files import atomic_path
from .checkpointing import CheckpointWriteCallback, barrier, publish, rotate, seal, staging_root
from .optim_in_backward import InBackwardAdamW


def _gathered(params):
    """Full copies of (possibly ZeRO-3 partitioned) parameters on the CPU."""
    try:
        from deepspeed import zero
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    except ImportError:
        return {k: p.detach().cpu().clone() for k, p in params}
    out = {}
    for name, p in params:
        if hasattr(p, "ds_id"):
            if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                with zero.GatheredParameters([p]):
                    out[name] = p.data.detach().cpu().clone()
                continue
        out[name] = p.detach().cpu().clone()
    return out


def adapter_state_dict(model):
    """Projector and Semantic Attention weights: what stage 1 trains and stage 2 starts from.

    The published stage-1 save kept only keys containing `mm_projector`, dropping the trained
    Semantic Attention; both are kept here.
    """
    named = [(k.removeprefix("base_model.model."), p) for k, p in model.named_parameters()]
    return _gathered([(k, p) for k, p in named if k.startswith(ADAPTER_PREFIXES)])


def save_adapter(model, output_dir, is_main, filename=ADAPTER_FILE):
    state = adapter_state_dict(model)  # every rank takes part in a ZeRO-3 gather
    if is_main:
        with atomic_path(os.path.join(output_dir, filename)) as tmp:  # the old file or the new one, never half
            torch.save(state, tmp)


class ModalityLengthGroupedSampler(Sampler):
    """Shuffled megabatches of one modality (multimodal or text-only), longest first inside each.

    Lengths are negative for text-only samples (LLaVA's convention). Batches never mix the two
    modalities, and lengths inside a megabatch are similar, which keeps padding low.
    """

    def __init__(self, lengths, batch_size, world_size, seed=0):
        self.lengths = lengths
        self.megabatch = batch_size * world_size
        self.seed = seed
        self.epoch = 0

    def __len__(self):
        return len(self.lengths)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)  # (seed, epoch) alone: resume replays it
        groups = []
        for keep in (lambda n: n > 0, lambda n: n <= 0):
            index = [i for i in torch.randperm(len(self.lengths), generator=generator).tolist()
                     if keep(self.lengths[i])]
            for start in range(0, len(index), self.megabatch):
                chunk = index[start:start + self.megabatch]
                groups.append(sorted(chunk, key=lambda i: -abs(self.lengths[i])))
        order = torch.randperm(len(groups), generator=generator).tolist()
        return iter([i for g in order for i in groups[g]])


class VStreamTrainer(Trainer):
    _staging_root = None  # set while `_save_checkpoint` runs: where the Trainer's own save writes

    def _get_train_sampler(self, *args, **kwargs):
        if self.train_dataset is None or not self.args.group_by_modality_length:
            return super()._get_train_sampler(*args, **kwargs)
        return ModalityLengthGroupedSampler(
            self.train_dataset.modality_lengths, self.args.train_batch_size,
            self.args.world_size, seed=self.args.seed)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs):
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, *args, **kwargs)
        if self.state.global_step >= max_steps:
            # Resumed from the run's last checkpoint (killed before its final outputs): nothing is left to
            # train. The Trainer would still run (and save) one step past max_steps; run no epoch instead.
            return num_train_epochs, 0
        return epochs_trained, steps_trained

    def create_optimizer(self, model=None):
        """`--optim_in_backward`: AdamW run inside the backward pass, with the Trainer's parameter groups (weight
        decay except on biases and norms) and AdamW settings; otherwise the Trainer's own optimizer."""
        if not self.args.optim_in_backward or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        self.optimizer = self._in_backward = InBackwardAdamW(
            [g for g in groups if g["params"]], lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon)
        return self.optimizer

    def _get_grad_norm(self, model, grad_norm=None):
        if self.args.optim_in_backward:  # every gradient is gone: the optimizer summed their squares as it went
            return self._in_backward.grad_norm()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _get_output_dir(self, trial):
        # During a save the Trainer's `_save_checkpoint` writes `<this>/checkpoint-N`: the staging root.
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        """Write `checkpoint-N` whole or not at all: the Trainer's full checkpoint (resume stays exact:
        optimizer, scheduler, RNG and data position) and, in stage 1, the adapter beside it, all staged
        under `.incomplete/`, sealed with a completion marker, then renamed into place."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = os.path.join(staging_root(run_dir), name)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # a killed save of the same step
        barrier()
        self._staging_root = staging_root(run_dir)
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
        finally:
            self._staging_root = None
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, CheckpointWriteCallback):
                callback.on_checkpoint_writing(self.args, self.state, self.control, folder=staged)
        if self.args.tune_mm_mlp_adapter:
            save_adapter(self.model, staged, self.args.should_save)
        barrier()  # every rank's files are in before the seal
        if self.args.should_save:
            seal(staged, self.state.global_step)
            final = os.path.join(run_dir, name)
            publish(staged, final)
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
            rotate(run_dir, self.args.save_total_limit, keep=self.state.best_model_checkpoint)
