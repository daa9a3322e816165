"""The original MMLU prompt code, transcribed character for character from Hendrycks et
al.'s `evaluate.py` (github.com/hendrycks/test, commit 0f23bce36fb9d6a6dd13d0d84f3f244821d9e646,
MIT license): `choices`, `format_subject`, `format_example`, `gen_prompt`, the prompt loop
of `eval` (with `crop` passed in) and the `pd.read_csv` calls of `main`. Tests compare
xgen's prompts with these, on pandas-read data, so nothing here may be "fixed"."""

import os

import pandas as pd

choices = ["A", "B", "C", "D"]


def format_subject(subject):
    l = subject.split("_")
    s = ""
    for entry in l:
        s += " " + entry
    return s


def format_example(df, idx, include_answer=True):
    prompt = df.iloc[idx, 0]
    k = df.shape[1] - 2
    for j in range(k):
        prompt += "\n{}. {}".format(choices[j], df.iloc[idx, j+1])
    prompt += "\nAnswer:"
    if include_answer:
        prompt += " {}\n\n".format(df.iloc[idx, k + 1])
    return prompt


def gen_prompt(train_df, subject, k=-1):
    prompt = "The following are multiple choice questions (with answers) about {}.\n\n".format(format_subject(subject))
    if k == -1:
        k = train_df.shape[0]
    for i in range(k):
        prompt += format_example(train_df, i)
    return prompt


def prompts(data_dir, subject, ntrain, crop):
    """`main`'s reads and `eval`'s prompt loop, returning (prompt, label) per test question."""
    dev_df = pd.read_csv(os.path.join(data_dir, "dev", subject + "_dev.csv"), header=None)[:ntrain]
    test_df = pd.read_csv(os.path.join(data_dir, "test", subject + "_test.csv"), header=None)
    out = []
    for i in range(test_df.shape[0]):
        # get prompt and make sure it fits
        k = ntrain
        prompt_end = format_example(test_df, i, include_answer=False)
        train_prompt = gen_prompt(dev_df, subject, k)
        prompt = train_prompt + prompt_end

        while crop(prompt) != prompt:
            k -= 1
            train_prompt = gen_prompt(dev_df, subject, k)
            prompt = train_prompt + prompt_end

        label = test_df.iloc[i, test_df.shape[1]-1]
        out.append((prompt, label))
    return out
