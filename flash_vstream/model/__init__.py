from .language_model.configuration_vstream import VStreamConfig
from .language_model.vstream_llama import VStreamLlamaForCausalLM

__all__ = ["VStreamConfig", "VStreamLlamaForCausalLM"]
