"""The offline demo: build a tiny Chinese BLOOM, fine-tune it with LoRA, and show what it learned.

Nothing is downloaded. The demo makes everything it needs:

1. A base model, shipped with loraft (demo/prebuilt/) and built by the code in demo/base.py: a byte-level BPE
   tokenizer with BLOOM's pre-tokenizer that keeps every ASCII character and common Chinese character one token,
   and a 4-layer BLOOM pretrained from scratch on a generated raw-text corpus (`loraft demo --rebuild-base`
   pretrains it anew into $LORAFT_HOME/demo; ship_demo_base() refreshes the shipped copy). The corpus shows five skills (uppercase letters, digits to Chinese numerals, digits read in English,
   antonyms, word-by-word translation) in plain-text forms such as "小写：abc\\n大写：ABC", never in a chat format.
2. An instruction set in alpaca format (Chinese instructions, several phrasings per task) with a held-out
   split whose inputs appear neither in the training split nor in the pretraining corpus.
3. A LoRA fine-tune with `configs/demo.yaml` and the human_assistant template: the adapter has to teach the
   base to read a Chinese instruction in the "Human: ...\\n\\nAssistant: " format, apply the right skill to
   the input and stop with EOS.
4. Held-out exact match before (the base, same prompt, greedy) and after (base + adapter), and a short chat.
5. `loraft demo --stage preference` (demo/preference.py): DPO from that run's adapter on generated pairs whose chosen
   answer follows a rule the SFT data never showed (end with "。") and whose rejected one is the bare answer; held-out
   preference accuracy, rule-following and content before (the SFT run) and after (the DPO run).
6. `loraft demo --stage rl` (demo/rl.py): GRPO from that run's adapter on prompts with inputs longer than any it
   trained on, rewarded for the exact answer; held-out exact match before (the SFT run) and after (the GRPO run).
"""

from loraft.demo.base import (BLOOM_SPLIT_PATTERN, DEMO_BASE_VERSION, PREBUILT_DIR, STAMP_FILE, BaseRecipe,
                              Progress, bloom_pre_tokenizer, build_demo_base, build_demo_tokenizer, build_tokenizer,
                              common_chinese_characters, default_home, demo_characters, raw_form_accuracy,
                              ship_demo_base)
from loraft.demo.preference import (PREFERENCE_CONFIG, RULE_MARK, follows_rule, make_preference_records,
                                    rule_following, run_preference_demo, with_rule, without_rule,
                                    write_preference_data)
from loraft.demo.rl import LONGER, RL_CONFIG, make_rl_records, run_rl_demo, write_rl_data
from loraft.demo.run import DEFAULT_CONFIG, exact_match, run_demo
from loraft.demo.tasks import (ANTONYM_PAIRS, ANTONYMS, ENGLISH_WORDS, TASK_FAMILIES, TASKS,
                               TaskFamily, is_heldout_input, make_records, pretraining_documents,
                               pretraining_examples, read_jsonl, write_demo_data)

__all__ = [
    "ANTONYMS", "ANTONYM_PAIRS", "BLOOM_SPLIT_PATTERN", "BaseRecipe", "DEFAULT_CONFIG", "DEMO_BASE_VERSION",
    "ENGLISH_WORDS", "LONGER", "PREBUILT_DIR", "PREFERENCE_CONFIG", "Progress", "RL_CONFIG", "RULE_MARK", "STAMP_FILE",
    "TASKS",
    "TASK_FAMILIES", "TaskFamily",
    "bloom_pre_tokenizer", "build_demo_base", "build_demo_tokenizer", "build_tokenizer", "common_chinese_characters",
    "default_home", "demo_characters", "exact_match", "follows_rule", "is_heldout_input", "make_preference_records",
    "make_records", "make_rl_records", "pretraining_documents", "pretraining_examples", "raw_form_accuracy", "read_jsonl", "rule_following",
    "run_demo", "run_preference_demo", "run_rl_demo", "ship_demo_base", "with_rule", "without_rule", "write_demo_data",
    "write_preference_data", "write_rl_data",
]
