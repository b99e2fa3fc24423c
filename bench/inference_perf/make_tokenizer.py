"""Write a small word-level Hugging Face tokenizer to a directory, for inference-perf offline.

inference-perf needs a tokenizer to size prompts and count tokens, and would download
one from the Hugging Face Hub; these machines are offline. A word-level tokenizer over
2000 made-up words loads with AutoTokenizer from a local path and is enough for
synthetic prompts (the simulator counts tokens as 4 characters, not with it).
Run it with the Python that has inference-perf (it needs `tokenizers`/`transformers`).

    python make_tokenizer.py DIR
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def main() -> None:
    out = Path(sys.argv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(2000):  # enough distinct ids for random token sampling
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=131072)
    fast.save_pretrained(out)
    print(json.dumps({"tokenizer": str(out), "vocab": len(vocab)}))


if __name__ == "__main__":
    main()
