"""The tokenizer files of a Hugging Face export, so that `AutoTokenizer`, `pipeline` and
`generate` use the export as they use Meta's own releases.

- Llama 3 (tiktoken): `tokenizer.json` built by transformers' own converter from the tiktoken
  file, with the 256 special tokens and BOS added in front of each text, as Meta's release does.
- Llama 2 / LLaMA 1 (SentencePiece): `tokenizer.model` as is, and a `tokenizer.json` of the same
  model built by transformers, given SentencePiece's own whitespace rules (a "▁" in front of the
  text and in place of every space; transformers' default would merge leading spaces).
- `tokenizer_config.json` with the family's special tokens and chat template (Jinja, rendering
  what `chat_template.encode_chat` encodes), and the ids that config.json and
  generation_config.json carry: BOS, and as EOS every token generation stops at (Llama 3: end of
  text, end of message, end of turn).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from llama_jax.tokenizer import LLAMA3_PATTERN, Tokenizer

# Meta's chat formats as transformers renders chat templates (see chat_template.py for the
# token-by-token account; tests check both give the same ids).
CHAT_TEMPLATES = {
    "llama3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
        "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
        "{%- set content = message['content'] | trim %}"
        "{%- if message['role'] == 'assistant' and content.startswith('<|python_tag|>') %}"
        "{{- content + '<|eom_id|>' }}"
        "{%- else %}{{- content + '<|eot_id|>' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "llama2": (
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
        "{%- set messages = messages[1:] %}"
        "{%- else %}{%- set system = '' %}{%- endif %}"
        "{%- for message in messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('Llama 2 dialogs alternate user and assistant, starting with user.') }}"
        "{%- endif %}"
        "{%- if message['role'] == 'user' %}"
        "{%- set content = (system + message['content']) if loop.first else message['content'] %}"
        "{{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
        "{%- else %}{{- ' ' + message['content'] | trim + ' ' + eos_token }}{%- endif %}"
        "{%- endfor %}"
    ),
}


def save_hf_tokenizer(tokenizer: Tokenizer, path: Path, *, max_seq_len: int) -> dict:
    """Writes the tokenizer files into `path`; returns {"bos_token_id", "eos_token_id"} for
    config.json and generation_config.json (eos a list where several tokens end a generation)."""
    path = Path(path)
    if tokenizer.family == "llama3":
        fast, bos, eos = _llama3_fast(tokenizer), "<|begin_of_text|>", "<|eot_id|>"
    else:
        fast, bos, eos = _sentencepiece_fast(tokenizer), "<s>", "</s>"
        shutil.copy(tokenizer.path, path / "tokenizer.model")
    fast.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATES[tokenizer.family],
    }
    if tokenizer.family == "llama3":
        config["pad_token"] = "<|finetune_right_pad_id|>"
    else:
        config.update(unk_token="<unk>", legacy=True)
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = {
        key: config[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token") if key in config
    }
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    stops = list(tokenizer.stop_ids) if tokenizer.family == "llama3" else [tokenizer.eos_id]
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops if len(stops) > 1 else stops[0]}


def _llama3_fast(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` of the tiktoken file: BPE over bytes, Meta's regex, the special
    tokens in id order, BOS in front of each text."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    fast = TikTokenConverter(
        vocab_file=tokenizer.path, pattern=LLAMA3_PATTERN, extra_special_tokens=specials
    ).converted()
    bos = "<|begin_of_text|>"
    fast.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, tokenizer.bos_id)],
            ),
        ]
    )
    return fast


def _sentencepiece_fast(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` of the SentencePiece model, as transformers builds it from
    tokenizer.model, with SentencePiece's whitespace rules and BOS in front of each text."""
    from tokenizers import normalizers, processors
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        shutil.copy(tokenizer.path, Path(scratch) / "tokenizer.model")
        (Path(scratch) / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True})
        )
        fast = AutoTokenizer.from_pretrained(scratch).backend_tokenizer
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast.pre_tokenizer = None
    fast.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", tokenizer.bos_id)]
    )
    return fast


def generation_config(special_ids: dict) -> dict:
    """generation_config.json: the ids a generation starts with and stops at."""
    return {"_from_model_config": False, **special_ids, "do_sample": False}
