"""lm-eval's `wikitext` task on the WikiText-2 test file shipped in data/ (no Hub): the 62 articles of
wiki.test.raw, each scored whole (rolling loglikelihood), with lm-eval's own detokenizer and metrics."""

import re

import datasets
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401

HEADING = re.compile(r"^ = [^=].* = $")  # an article's title line: " = Robert Boulter = "


def articles(lines: datasets.Dataset) -> datasets.Dataset:
    """Lines of the raw file -> one document per article (what EleutherAI/wikitext_document_level holds)."""
    pages, page = [], []
    for text in lines["text"]:
        if HEADING.match(text) and page:
            pages.append("\n".join(page) + "\n")
            page = []
        page.append(text)
    if page:
        pages.append("\n".join(page) + "\n")
    return datasets.Dataset.from_dict({"page": pages})
