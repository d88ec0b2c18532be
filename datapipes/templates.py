"""Chat templates (Jinja, as Hugging Face tokenizers carry them) for the LLMs segcap trains: Vicuna v1 and
Llama-2 chat as LLaVA/LISA build their prompts. {% generation %} marks what the labels keep (the
assistant's words and its end token); launcher/tokenizer.py picks one by model.llm.chat_template."""

from __future__ import annotations

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "\\'") + "'"


# Vicuna v1 (LLaVA's conv_vicuna_v1): system + " " + "USER: q" + " " + "ASSISTANT: a" + "</s>" + "USER: ...",
# and "ASSISTANT:" as the generation prompt.
VICUNA_V1_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}{% set loop_messages = messages[1:] %}"
    "{% else %}{{ " + _quoted(VICUNA_SYSTEM + " ") + " }}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Llama-2 chat (LLaVA's conv_llava_llama_2): "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q1} [/INST] {a1} </s>"
# then "<s>[INST] {q2} [/INST] {a2} </s>"; a generation starts right after "[/INST]".
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = " + _quoted(LLAMA2_SYSTEM) + " %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% else %}{% generation %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endgeneration %}{% endif %}"
    "{% endfor %}"
)

TEMPLATES = {"vicuna_v1": VICUNA_V1_TEMPLATE, "llama2": LLAMA2_TEMPLATE}
