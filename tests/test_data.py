"""Prompt, SFT and preference datasets: formats, field names, malformed records, chat templates, and the
datasets shipped in experiments/data/."""

import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from rlhf_ray.data import (
    DataError, DatasetConfig, PreferenceRecord, PromptRecord, SFTRecord, detect_format, format_prompt,
    format_records, load_preferences, load_prompts, load_ratings, load_sft,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "experiments" / "data"

# a template in the shape of SmolLM2's (ChatML), for tokenizers built here
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item a record (dict, dumped as JSON) or a raw line (str, written as it is)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def pair(i: int) -> dict:
    return {"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}


# ---------------------------------------------------------------- JSONL

def test_jsonl_records_load_in_file_order(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [pair(0), pair(1), pair(2)])
    assert load_preferences(path) == [PreferenceRecord(f"p{i}", f"good {i}", f"bad {i}") for i in range(3)]
    assert load_prompts(path) == [PromptRecord("p0"), PromptRecord("p1"), PromptRecord("p2")]


def test_missing_field_names_file_and_line(tmp_path):
    lines = [pair(i) for i in range(20)]
    del lines[16]["chosen"]
    path = write_jsonl(tmp_path / "prefs.jsonl", lines)
    with pytest.raises(DataError, match=r"prefs\.jsonl:17: missing field 'chosen'$"):
        load_preferences(path)


def test_invalid_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}, '{"prompt": "c"'])
    with pytest.raises(DataError, match=r"prompts\.jsonl:3: not valid JSON \(.+\)"):
        load_prompts(path)


@pytest.mark.parametrize("line, problem", [
    ('["a list"]', "not a JSON object (got list)"),
    ('{"prompt": 3}', "field 'prompt' is not a string (got int 3)"),
    ('{"prompt": null}', "field 'prompt' is null"),
    ('{"prompt": "   "}', "field 'prompt' is blank"),
])
def test_malformed_record_says_what_is_wrong(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, line])
    with pytest.raises(DataError) as raised:
        load_prompts(path)
    assert str(raised.value) == f"{path}:2: {problem}"


def test_comparison_of_a_response_with_itself_is_malformed(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError, match=r":1: fields 'chosen' and 'rejected' are the same text"):
        load_preferences(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: not valid UTF-8"):
        load_prompts(path)


def test_blank_lines_are_not_records(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, "", "   ", {"prompt": "b"}, ""])
    assert load_prompts(path) == [PromptRecord("a"), PromptRecord("b")]


def test_skip_leaves_out_malformed_records_and_counts_them_in_the_log(tmp_path, caplog):
    lines = [pair(0), "{broken", pair(1), {"prompt": "p", "chosen": "c"}, pair(2)]
    path = write_jsonl(tmp_path / "prefs.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.data"):
        records = load_preferences(path, on_error="skip")
    assert [r.prompt for r in records] == ["p0", "p1", "p2"]
    assert "skipped 2 malformed record(s), kept 3" in caplog.text
    assert "prefs.jsonl:2: not valid JSON" in caplog.text  # the first one, named


def test_a_dataset_with_no_valid_record_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(DataError, match=r"no records \(all 2 were malformed, the first: .*:1: missing field 'prompt'"):
        load_prompts(path, on_error="skip")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records \(it is empty\)"):
        load_prompts(empty)


def test_field_names_are_configurable(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"question": "q", "answer": "a", "extra": 1}])
    assert load_sft(path, prompt_field="question", response_field="answer") == [SFTRecord("q", "a")]
    assert load_prompts(path, field="question") == [PromptRecord("q")]


def test_limit_stops_after_that_many_records(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": str(i)} for i in range(10)] + ["{broken"])
    assert [r.prompt for r in load_prompts(path, limit=3)] == ["0", "1", "2"]


def test_skip_leaves_out_the_first_records_unchecked(tmp_path):
    # the split another stage trains on: its records are not read, so a malformed one there is not reported
    path = write_jsonl(tmp_path / "prompts.jsonl", ["{broken"] + [{"prompt": str(i)} for i in range(1, 6)])
    assert [r.prompt for r in load_prompts(path, skip=3, limit=2)] == ["3", "4"]
    assert [r.prompt for r in DatasetConfig(path=str(path), skip=4).load_prompts()] == ["4", "5"]
    with pytest.raises(DataError, match=r"prompts.jsonl: no records \(none after the first 6 \(skip\)\)"):
        load_prompts(path, skip=6)


def test_on_error_must_be_raise_or_skip(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        load_prompts(path, on_error="ignore")


# ---------------------------------------------------------------- formats

def test_format_is_told_by_suffix_or_folder(tmp_path):
    assert detect_format(tmp_path / "a.jsonl") == "jsonl"
    assert detect_format(tmp_path / "a.ndjson") == "jsonl"
    assert detect_format(tmp_path / "a.parquet") == "parquet"
    with pytest.raises(DataError, match=r"a\.csv: cannot tell the format from the suffix '\.csv'"):
        detect_format(tmp_path / "a.csv")
    with pytest.raises(DataError, match="not one that `datasets` save_to_disk wrote"):
        detect_format(tmp_path)


def test_a_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.jsonl: no such file or folder"):
        load_prompts(tmp_path / "nothere.jsonl")


def test_a_jsonl_file_with_an_explicit_format_needs_no_suffix(tmp_path):
    path = write_jsonl(tmp_path / "prompts.txt", [{"prompt": "a"}])
    assert load_prompts(path, format="jsonl") == [PromptRecord("a")]


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_records_load(tmp_path):
    path = write_parquet(tmp_path / "sft.parquet", {"prompt": ["a", "b"], "response": ["x", "y"], "n": [1, 2]})
    assert load_sft(path) == [SFTRecord("a", "x"), SFTRecord("b", "y")]


def test_parquet_malformed_row_is_named_by_index(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", {"prompt": ["a", "b", None, "d", "e", "f"]})
    with pytest.raises(DataError, match=r"^row 2 of x\.parquet: field 'prompt' is null$"):
        load_prompts(path)
    assert len(load_prompts(path, on_error="skip")) == 5


def test_parquet_without_a_field_names_the_columns_it_has(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", {"prompt": ["a"], "better": ["b"], "worse": ["c"]})
    with pytest.raises(DataError, match=r"x\.parquet: no column 'chosen', 'rejected' \(it has 'prompt', 'better', "
                                        r"'worse'\); set the field names"):
        load_preferences(path, on_error="skip")  # a wrong field name is not a malformed record
    assert load_preferences(path, chosen_field="better", rejected_field="worse") == [PreferenceRecord("a", "b", "c")]


def test_a_file_that_is_not_parquet_is_an_error(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        load_prompts(path)


needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                                    reason="the `datasets` package is not installed (pip install datasets)")


@needs_datasets
def test_a_datasets_folder_loads(tmp_path):
    import datasets

    folder = tmp_path / "prefs_ds"
    datasets.Dataset.from_dict({"prompt": ["a", "b"], "chosen": ["c", "d"], "rejected": ["e", ""]}).save_to_disk(folder)
    assert detect_format(folder) == "hf"
    with pytest.raises(DataError, match=r"^row 1 of prefs_ds: field 'rejected' is blank$"):
        load_preferences(folder)
    assert load_preferences(folder, on_error="skip") == [PreferenceRecord("a", "c", "e")]


@needs_datasets
def test_a_datasets_folder_with_splits_needs_one_chosen(tmp_path):
    import datasets

    folder = tmp_path / "ds"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": ["t1", "t2"]}),
        "test": datasets.Dataset.from_dict({"prompt": ["e1"]}),
    }).save_to_disk(folder)
    with pytest.raises(DataError, match=r"splits 'train', 'test'; choose one with split"):
        load_prompts(folder)
    with pytest.raises(DataError, match=r"no split 'dev' \(it has 'train', 'test'\)"):
        load_prompts(folder, split="dev")
    assert load_prompts(folder, split="test") == [PromptRecord("e1")]
    assert DatasetConfig(path=str(folder), split="train").load_prompts() == [PromptRecord("t1"), PromptRecord("t2")]


# ---------------------------------------------------------------- DatasetConfig

def test_dataset_config_reads_with_its_field_names(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"q": "p", "better": "c", "worse": "r"}, {"q": "p2"}])
    config = DatasetConfig(path=str(path), prompt_field="q", chosen_field="better", rejected_field="worse",
                           on_error="skip")
    assert config.load_preferences() == [PreferenceRecord("p", "c", "r")]
    assert config.load_prompts() == [PromptRecord("p"), PromptRecord("p2")]


def test_dataset_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="promt_field"):
        DatasetConfig(path="x.jsonl", promt_field="q")
    with pytest.raises(ValidationError, match="on_error"):
        DatasetConfig(path="x.jsonl", on_error="ignore")
    with pytest.raises(ValidationError, match="format"):
        DatasetConfig(path="x.jsonl", format="csv")
    with pytest.raises(ValidationError, match="prompt_field"):
        DatasetConfig(path="x.jsonl", prompt_field=" ")
    assert DatasetConfig(path="x.jsonl").chat_template is None  # auto


# ---------------------------------------------------------------- chat templates

@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tiny_tokenizer.chat_template = CHATML
    return tiny_tokenizer


def test_format_prompt_wraps_a_user_turn_for_a_chat_model(chat_tokenizer):
    assert format_prompt(chat_tokenizer, "hello there", chat=True) == (
        "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    assert format_prompt(chat_tokenizer, "hello there", chat=False) == "hello there"


def test_a_prompt_already_in_the_chat_template_is_not_wrapped_twice(chat_tokenizer):
    # a served chat's prompt as `rlhf-ray feedback export` writes it, with a system turn of its own
    rendered = chat_tokenizer.apply_chat_template([{"role": "system", "content": "be kind"},
                                                   {"role": "user", "content": "hello there"}],
                                                  add_generation_prompt=True, tokenize=False)
    assert format_prompt(chat_tokenizer, rendered, chat=True) == rendered
    assert format_records([PreferenceRecord(rendered, "a", "b")], chat_tokenizer)[0].prompt == rendered
    # a prompt that merely mentions the template's tokens midway is still wrapped
    assert format_prompt(chat_tokenizer, "what does <|im_end|> mean?", chat=True).count("<|im_start|>user") == 1


def test_chat_template_auto_applies_only_when_the_tokenizer_has_one(chat_tokenizer):
    from rlhf_ray.models import build_tiny_tokenizer

    records = [SFTRecord("the movie was", "great .")]
    assert format_records(records, build_tiny_tokenizer()) == records  # a base model: no template
    formatted = format_records(records, chat_tokenizer)
    assert formatted == [SFTRecord("<|im_start|>user\nthe movie was<|im_end|>\n<|im_start|>assistant\n", "great .")]
    assert format_records(records, chat_tokenizer, chat_template=False) == records


def test_forcing_a_chat_template_on_a_base_model_is_an_error(tiny_tokenizer):
    with pytest.raises(DataError, match="chat_template is true, but the tokenizer .* has no chat template"):
        format_records([PromptRecord("the day")], tiny_tokenizer, chat_template=True)


def test_dataset_config_formats_prompts_with_a_tokenizer(chat_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    config = DatasetConfig(path=str(path))
    assert config.load_prompts(chat_tokenizer)[0].prompt.endswith("<|im_start|>assistant\n")
    assert DatasetConfig(path=str(path), chat_template=False).load_prompts(chat_tokenizer) == [PromptRecord("hi")]


# ---------------------------------------------------------------- the shipped datasets

def shipped_datasets(prefix: str) -> tuple[list, list, list, list]:
    """The prompts, held-out prompts, SFT demonstrations and preference pairs of experiments/data whose file
    names start with `prefix`; the held-out prompts are not training prompts."""
    prompts = load_prompts(DATA_DIR / f"{prefix}prompts.jsonl")
    heldout = load_prompts(DATA_DIR / f"{prefix}prompts_heldout.jsonl")
    assert not {r.prompt for r in prompts} & {r.prompt for r in heldout}
    return (prompts, heldout, load_sft(DATA_DIR / f"{prefix}sft.jsonl"),
            load_preferences(DATA_DIR / f"{prefix}preferences.jsonl"))


def test_shipped_toy_datasets_use_the_tiny_vocabulary_and_plant_the_preference():
    from envs.builtin import sentiment_score
    from rlhf_ray.models.tiny import VOCABULARY

    prompts, heldout, sft, pairs = shipped_datasets("")
    assert len(prompts) >= 200 and len(heldout) >= 50 and len(sft) >= 200 and len(pairs) >= 200
    texts = [r.prompt for r in prompts + heldout] + [t for r in sft for t in (r.prompt, r.response)]
    texts += [t for r in pairs for t in (r.prompt, r.chosen, r.rejected)]
    assert set(" ".join(texts).split()) <= set(VOCABULARY)
    assert all(sentiment_score(r.response) > 0 for r in sft)
    assert all(sentiment_score(r.chosen) > sentiment_score(r.rejected) for r in pairs)
    assert all(len(r.chosen.split()) == len(r.rejected.split()) for r in pairs)  # length tells nothing


def test_shipped_assistant_datasets_load():
    prompts, heldout, sft, pairs = shipped_datasets("assistant_")
    assert len(pairs) >= 150 and len(sft) >= 150 and len(prompts) >= 200 and len(heldout) >= 40
    rude = tuple(make_data_module().RUDE_OPENERS)
    for r in pairs:  # chosen: polite and concise; rejected: rude, or rambling (over twice as long), or both
        assert not r.chosen.startswith(rude)
        assert r.rejected.startswith(rude) or len(r.rejected) > 2 * len(r.chosen), r


def make_data_module():
    spec = importlib.util.spec_from_file_location("make_data", DATA_DIR / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    return make_data


def test_shipped_datasets_are_what_make_data_writes(tmp_path):
    make_data = make_data_module()
    assert make_data.main(["--check"]) == 0, "experiments/data is stale: run python experiments/data/make_data.py"
    make_data.main(["--out", str(tmp_path)])  # and a second run writes the same bytes
    for written in (path for path in tmp_path.rglob("*") if path.is_file()):
        assert written.read_bytes() == (DATA_DIR / written.relative_to(tmp_path)).read_bytes()


def test_ratings_and_likes_become_a_satisfaction_in_0_1(tmp_path):
    path = write_jsonl(tmp_path / "ratings.jsonl", [
        {"prompt": "p", "response": "a", "rating": 1}, {"prompt": "p", "response": "b", "rating": 5},
        {"prompt": "p", "response": "c", "rating": 4.0}, {"prompt": "p", "response": "d", "like": True},
        {"prompt": "p", "response": "e", "like": False, "rating": None}])
    assert [(r.response, r.satisfaction) for r in load_ratings(path)] == \
        [("a", 0.0), ("b", 1.0), ("c", 0.75), ("d", 1.0), ("e", 0.0)]
    config = DatasetConfig(path=str(path), rating_field="stars", like_field="thumb", limit=1)
    with pytest.raises(DataError, match=r"ratings.jsonl:1: missing field 'stars' \(a rating 1..5\) or 'thumb'"):
        config.load_ratings()


@pytest.mark.parametrize("record, message", [
    ({"rating": 6}, "field 'rating' must be a whole rating from 1 to 5, got 6"),
    ({"rating": 2.5}, "field 'rating' must be a whole rating from 1 to 5, got 2.5"),
    ({"rating": "5"}, "field 'rating' must be a whole rating from 1 to 5, got '5'"),
    ({"rating": True}, "field 'rating' must be a whole rating from 1 to 5, got True"),
    ({"like": 1}, "field 'like' must be true or false, got 1"),
    ({"like": True, "rating": 3}, "fields 'rating' and 'like' are both set"),
])
def test_a_bad_rating_names_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "ratings.jsonl", [{"prompt": "p", "response": "r", "rating": 3},
                                                    {"prompt": "p", "response": "r", **record}])
    with pytest.raises(DataError, match=re.escape(f"ratings.jsonl:2: {message}")):
        load_ratings(path)
    assert len(load_ratings(path, on_error="skip")) == 1
