"""`VStreamLlamaForCausalLM`: LLaMA (Vicuna) reading the STAR memory through the `<image>` slot."""

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

from ...constants import IMAGE_TOKEN_INDEX
from ..vstream_arch import VStreamMetaForCausalLM, VStreamMetaModel
from .configuration_vstream import VStreamConfig

VISION_TOWER_PREFIX = "model.vision_tower."


class VStreamLlamaModel(VStreamMetaModel, LlamaModel):
    config_class = VStreamConfig

    def __init__(self, config: VStreamConfig):
        super().__init__(config)


class VStreamLlamaForCausalLM(VStreamMetaForCausalLM, LlamaPreTrainedModel, GenerationMixin):
    config_class = VStreamConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: VStreamConfig):
        super().__init__(config)
        self.model = VStreamLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                features=None, images=None, memory=None, frozen_memory=None, logits_to_keep=0, **kwargs):
        """Causal-LM forward; `input_ids` may hold expanded `<image>` positions (-200).

        `features` (list of (T, 256, D)), `images` (list of (T, 3, H, W)) or `memory` (list of
        (N, D) memory tokens) supply what those positions become; in training `frozen_memory` (list of
        `memory.frozen_memory` dicts) instead. Cache arguments pass through.
        """
        media_given = any(x is not None for x in (features, images, memory, frozen_memory))
        # Decode steps (one new token, no media) skip the splice and its host sync.
        if inputs_embeds is None and (media_given or self.training or input_ids.shape[1] > 1
                                      and bool((input_ids == IMAGE_TOKEN_INDEX).any())):
            tokens = self.memory_tokens(features=features, images=images, memory=memory, frozen_memory=frozen_memory)
            # packed rows (no mask, positions restarting per sample, `train.packing`): one sample per run
            packed = kwargs.get("position_ids") if attention_mask is None else None
            inputs_embeds = self.embed_with_memory(input_ids, tokens, packed_position_ids=packed)
            input_ids = None
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                             **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]  # (B, k, hidden)
        logits = self.lm_head(hidden)  # (B, L, vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=getattr(outputs, "past_key_values", None),
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    @torch.no_grad()
    def generate(self, input_ids=None, features=None, images=None, memory=None, attention_mask=None, **kwargs):
        """Generate from prompts holding one `<image>` each; returns only the new tokens.

        One entry of `features` / `images` / `memory` per batch row (rows without `<image>` take
        none). The placeholder is expanded to the memory size and the prompt is embedded here.
        """
        tokens = self.memory_tokens(features=features, images=images, memory=memory)
        if input_ids is None or tokens is None and not (input_ids == IMAGE_TOKEN_INDEX).any():
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        pad = self.generation_config.pad_token_id
        pad = 0 if pad is None else (pad[0] if isinstance(pad, (list, tuple)) else pad)
        input_ids, attention_mask = self.expand_for_generation(input_ids, tokens, attention_mask, pad)
        inputs_embeds = self.embed_with_memory(input_ids, tokens)
        return super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def save_pretrained(self, save_directory, state_dict=None, **kwargs):
        # The vision tower is not part of a Flash-VStream checkpoint: it is re-read from
        # `mm_vision_tower` (as the released checkpoint expects).
        state_dict = self.state_dict() if state_dict is None else state_dict
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(VISION_TOWER_PREFIX)}
        super().save_pretrained(save_directory, state_dict=state_dict, **kwargs)


AutoConfig.register("vstream", VStreamConfig)
AutoModelForCausalLM.register(VStreamConfig, VStreamLlamaForCausalLM)
