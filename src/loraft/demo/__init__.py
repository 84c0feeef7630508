"""The offline demo: build a tiny Chinese BLOOM, fine-tune it with LoRA, and show what it learned.

Nothing is downloaded. The demo makes everything it needs:

1. A base model (built once, cached under $LORAFT_HOME/demo, by default ~/.cache/loraft/demo): a byte-level BPE
   tokenizer that covers Chinese, and a 4-layer BLOOM pretrained from scratch on a generated raw-text
   corpus. The corpus shows five skills (uppercase letters, digits to Chinese numerals, digits read in English,
   antonyms, word-by-word translation) in plain-text forms such as "小写：abc\\n大写：ABC", never in a chat format.
2. An instruction set in alpaca format (Chinese instructions, several phrasings per task) with a held-out
   split whose inputs appear neither in the training split nor in the pretraining corpus.
3. A LoRA fine-tune with `configs/demo.yaml` and the human_assistant template: the adapter has to teach the
   base to read a Chinese instruction in the "Human: ...\\n\\nAssistant: " format, apply the right skill to
   the input and stop with EOS.
4. Held-out exact match before (the base, same prompt, greedy) and after (base + adapter), and a short chat.
"""

from loraft.demo.base import (DEMO_BASE_VERSION, STAMP_FILE, BaseRecipe, Progress, build_demo_base,
                              build_tokenizer, common_chinese_characters, default_home, raw_form_accuracy)
from loraft.demo.run import DEFAULT_CONFIG, exact_match, run_demo
from loraft.demo.tasks import (ANTONYM_PAIRS, ANTONYMS, ENGLISH_WORDS, TASK_FAMILIES, TASKS,
                               TaskFamily, is_heldout_input, make_records, pretraining_documents,
                               pretraining_examples, read_jsonl, write_demo_data)

__all__ = [
    "ANTONYMS", "ANTONYM_PAIRS", "BaseRecipe", "DEFAULT_CONFIG", "DEMO_BASE_VERSION", "ENGLISH_WORDS", "Progress",
    "STAMP_FILE", "TASKS", "TASK_FAMILIES", "TaskFamily", "build_demo_base", "build_tokenizer",
    "common_chinese_characters", "default_home", "exact_match", "is_heldout_input", "make_records",
    "pretraining_documents", "pretraining_examples", "raw_form_accuracy", "read_jsonl", "run_demo",
    "write_demo_data",
]
