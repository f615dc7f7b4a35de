"""
Spelling and letter counting, synthetic tasks that teach a small model what its tokens are made
of ("How many r are in strawberry?" -> 3):

    SpellingBee(size, split)     count a letter in a word: spell the word out, count by hand,
                                 check with the python tool, answer "#### <count>"
    SimpleSpelling(size, split)  just spell a word: "Spell the word: cat" -> "cat:c,a,t"

Example i of the train split is generated from random.Random(i), of the test split from
random.Random(10_000_000 + i) (an offset larger than the word list, so the two never share a
seed), so examples are the same in every run without storing them. Words come from dwyl's
english-words list (370K words), downloaded once to $NANOCHAT_BASE_DIR/words_alpha.txt;
without internet `python -m dev.offline_data tasks` writes that file from the english-words
package. Preview a few examples with `python -m tasks.spellingbee`.
"""

import random
import string

from nanochat.common import MissingInputError, download_file_with_lock, get_base_dir
from tasks.common import Task
from tasks.gsm8k import score_final_answer

LETTERS = string.ascii_lowercase
WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORD_LIST_FILENAME = "words_alpha.txt"
TEST_RANDOM_SEED_OFFSET = 10_000_000
SPLITS = ("train", "test")

# How people ask; varied for data augmentation (English, Spanish, Chinese, Korean, French, German, Japanese)
USER_MSG_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
]
QUOTES = ["", "'", '"']


def load_words():
    """The word list, one word per line of $NANOCHAT_BASE_DIR/words_alpha.txt (downloaded on first use)."""
    try:
        path = download_file_with_lock(WORD_LIST_URL, WORD_LIST_FILENAME)
    except OSError as error:  # URLError, timeouts, a cut-short body
        raise MissingInputError(
            f"cannot download the word list {WORD_LIST_URL} ({error}) and there is no "
            f"{get_base_dir()}/{WORD_LIST_FILENAME}; without internet, build it with `python -m dev.offline_data tasks`"
        ) from None
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def example_rng(split, index):
    return random.Random(index if split == "train" else TEST_RANDOM_SEED_OFFSET + index)


def check_split(name, split):
    if split not in SPLITS:
        raise ValueError(f"{name} split must be one of {', '.join(SPLITS)}, got {split!r}")


def spelling_parts(word, letter):
    """The assistant's answer: a manual count, a python double check, and the final '#### <count>'."""
    count = word.count(letter)
    manual = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n\n"
              f"First spell the word out:\n{word}:{','.join(word)}\n\n"
              f"Then count the occurrences of '{letter}':\n")
    running = 0
    for position, char in enumerate(word, 1):
        # no space between the position and the character: " a" and "a" are different tokens
        if char == letter:
            running += 1
            manual += f"{position}:{char} hit! count={running}\n"
        else:
            manual += f"{position}:{char}\n"
    manual += f"\nThis gives us {running}."
    return [
        {"type": "text", "text": manual},
        {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
    ]


class WordTask(Task):
    """`size` generated examples over the English word list, split "train" or "test"."""

    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        check_split(type(self).__name__, split)
        self.size, self.split = size, split
        self.words = load_words()

    def num_examples(self):
        return self.size


class SpellingBee(WordTask):

    def get_example(self, index):
        # The order of the rng calls fixes every example; changing it changes the dataset.
        rng = example_rng(self.split, index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)  # 10%: often a letter not in the word
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:  # people who do not use shift
            template = template.lower()
        letter_quote, word_quote = rng.choice(QUOTES), rng.choice(QUOTES)
        user_message = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            user_message += "?"
        return {"messages": [
            {"role": "user", "content": user_message},
            {"role": "assistant", "content": spelling_parts(word, letter)},
        ]}

    def evaluate(self, conversation, assistant_response):
        """1 if the '#### <count>' of the response equals the reference's, else 0 (as GSM8K)."""
        return score_final_answer(conversation, assistant_response)

    def reward(self, conversation, assistant_response):
        return float(self.evaluate(conversation, assistant_response))


class SimpleSpelling(WordTask):
    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(size, split, **kwargs)
        random.Random(42).shuffle(self.words)  # a different word order than SpellingBee's

    def get_example(self, index):
        word = example_rng(self.split, index).choice(self.words)
        return {"messages": [
            {"role": "user", "content": f"Spell the word: {word}"},
            {"role": "assistant", "content": f"{word}:{','.join(word)}"},
        ]}


if __name__ == "__main__":
    task = SpellingBee()
    for i in range(10):
        example = task.get_example(i)
        print("=" * 100)
        print(example["messages"][0]["content"])
        print("-" * 100)
        for part in example["messages"][1]["content"]:
            text = {"python": "<<{}=", "python_output": "{}>>"}.get(part["type"], "{}").format(part["text"])
            print(text, end="")
        print()
