"""The transcript GPT-2 continues when it chats: the chat template a base model lacks.

"Human: ...\nAI: ..." lines, as the tutorial's chat mode writes them; a reply ends where the
model would begin the next speaker's line. Rendered by transformers' `apply_chat_template`, as
any template (`--chat-template FILE`) is.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# GPT-2 continues a transcript; it "ends its turn" by starting the next speaker's line.
STOP_STRINGS = ("\nHuman:", "\nAI:")

# A system (or developer) message opens the transcript as plain text.
TRANSCRIPT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] in ('system', 'developer') -%}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Human: ' + message['content'] + '\\n' }}"
    "{%- else -%}{{ 'AI: ' + message['content'] + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}AI:{%- endif -%}"
)


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[tuple[str, str]],
    template: str | None = None,
) -> str:
    """The prompt text of a chat: `template` (Jinja, as Hugging Face's), else the transcript."""
    conversation = [{"role": role, "content": text} for role, text in messages]
    return tokenizer.apply_chat_template(
        conversation,
        chat_template=template or TRANSCRIPT_TEMPLATE,
        add_generation_prompt=True,
        tokenize=False,
    )
