"""Conversation templates (LLaVA's `vicuna_v1`/`v1`, `plain`, `llama_2`) and the training label mask.

A template renders messages into one prompt string. `Conversation.segments()` renders the same
string as (text, is_target) pieces, so training can supervise exactly the assistant replies
without re-deriving lengths by tokenising parts of the prompt.
"""

import dataclasses
from enum import Enum, auto

from .constants import DEFAULT_IMAGE_TOKEN


class SeparatorStyle(Enum):
    TWO = auto()      # vicuna v1: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    PLAIN = auto()    # stage-1 captions: "<image>caption\n"
    LLAMA_2 = auto()  # "[INST] <<SYS>>...<</SYS>> q [/INST] a </s><s>[INST] ..."


@dataclasses.dataclass
class Conversation:
    system: str
    roles: tuple
    messages: list
    sep_style: SeparatorStyle
    sep: str = " "
    sep2: str = ""
    version: str = ""

    def copy(self):
        return dataclasses.replace(self, messages=[list(m) for m in self.messages])

    def append_message(self, role, message):
        self.messages.append([role, message])

    def get_prompt(self):
        return "".join(text for text, _ in self.segments())

    def segments(self):
        """The prompt as (text, is_target) pieces; targets are the assistant replies and their stop."""
        pieces = []
        if self.sep_style is SeparatorStyle.TWO:
            pieces.append((self.system + self.sep, False))
            for i, (role, message) in enumerate(self.messages):
                if message is None:
                    pieces.append((role + ":", False))
                elif role == self.roles[1]:
                    pieces.append((role + ": ", False))
                    pieces.append((message + self.sep2, True))
                else:
                    pieces.append((role + ": " + message + self.sep, False))
        elif self.sep_style is SeparatorStyle.PLAIN:
            for role, message in self.messages:
                if message is None:
                    continue
                if role == self.roles[1]:
                    pieces.append((message + self.sep, True))
                else:
                    pieces.append((message, False))
        elif self.sep_style is SeparatorStyle.LLAMA_2:
            for i, (role, message) in enumerate(self.messages):
                if message is None:
                    continue
                if role == self.roles[0]:
                    if i == 0:
                        message = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{message}" if self.system else message
                    pieces.append((f"[INST] {message.strip()} [/INST]", False))
                else:
                    pieces.append((" " + message.strip() + " " + self.sep2, True))
        else:  # pragma: no cover - enum is closed
            raise ValueError(f"unknown separator style {self.sep_style}")
        return pieces


conv_vicuna_v1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)

conv_plain = Conversation(
    system="",
    roles=("", ""),
    messages=[],
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
    version="plain",
)

conv_llama_2 = Conversation(
    system="You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
           "while being safe.",
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
    version="llama_v2",
)

default_conversation = conv_vicuna_v1
conv_templates = {
    "vicuna_v1": conv_vicuna_v1,
    "v1": conv_vicuna_v1,
    "plain": conv_plain,
    "llama_2": conv_llama_2,
}


def conversation_from_record(turns, template):
    """LLaVA-format turns [{from: human|gpt, value}] -> a filled copy of `template`.

    The `<image>` placeholder is moved to the front of the first human turn (as the published
    data loader did for both images and videos); the `plain` template keeps only the placeholder
    of the human turn, so stage 1 learns captions conditioned on the memory alone.
    """
    conv = conv_templates[template].copy() if isinstance(template, str) else template.copy()
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    for i, turn in enumerate(turns):
        speaker = turn.get("from")
        if speaker not in roles:
            raise ValueError(f"turn {i}: 'from' must be 'human' or 'gpt', got {speaker!r}")
        if roles[speaker] != conv.roles[i % 2] and conv.sep_style is not SeparatorStyle.PLAIN:
            raise ValueError(f"turn {i}: expected alternating human/gpt turns starting with human")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {i}: 'value' must be a string")
        if DEFAULT_IMAGE_TOKEN in value:
            value = value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            value = DEFAULT_IMAGE_TOKEN + "\n" + value if value else DEFAULT_IMAGE_TOKEN
        if conv.sep_style is SeparatorStyle.PLAIN and speaker == "human":
            value = DEFAULT_IMAGE_TOKEN if DEFAULT_IMAGE_TOKEN in value else ""
        conv.append_message(roles[speaker], value)
    return conv


def build_prompt(question, template="vicuna_v1", system=None, options=None, history=()):
    """The generation prompt for `question`: the one way eval, the streaming session and the
    benchmarks build it.

    template: a template name or a Conversation. system: replaces the template's system message.
    history: earlier [(question, answer)] exchanges. The one `<image>` placeholder opens the first
    user turn, so the prompt through it stays the same as the conversation grows. options: listed
    after the question as `(A) ...`, `(B) ...`. The prompt ends with the assistant's open turn.
    """
    conv = conv_templates[template].copy() if isinstance(template, str) else template.copy()
    if system is not None:
        conv.system = system
    if options:
        question = f"{question}\nOptions:\n" + "\n".join(f"({chr(ord('A') + k)}) {o}" for k, o in enumerate(options))
    for i, (q, a) in enumerate([*history, (question, None)]):
        conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{q}" if i == 0 else q)
        conv.append_message(conv.roles[1], a)
    return conv.get_prompt()
