"""Write a perplexity request file from C4's train split (offline: local or built-in text).

    python c4_train/getdata.py --num-docs 1000 --output ../data/c4_train.jsonl
    python c4_train/getdata.py --offline --num-docs 40 --max-tokens 256 --tokenizer ../pretrained_models/smollm2-135m-instruct

See task_datasets/c4_requests.py for every option.
"""

from dejavu_llama.task_datasets.c4_requests import script_main

if __name__ == "__main__":
    script_main("train", "c4_train.jsonl", default_num_docs=1000)
