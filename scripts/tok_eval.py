"""
Compare our tokenizer's compression (bytes per token) with GPT-2's and GPT-4's (cl100k_base) on
several kinds of text: news prose, Korean, Python code, LaTeX math, dense science prose, and the
first row group of the train and val shards of the chosen dataset (NANOCHAT_DATASET, default
climbmix; rows labelled e.g. climbmix-train). More bytes per token = shorter sequences for the
same text.

    python -m scripts.tok_eval

Single process, CPU, no flags. Reads $NANOCHAT_BASE_DIR/tokenizer/ (from tok_train) and the
shards. The GPT-2/GPT-4 ranks come from $NANOCHAT_BASE_DIR/tiktoken_refs/, else from tiktoken; on a
machine without internet fetch them once with `python -m dev.offline_data tiktoken` (a missing
baseline is reported in one line and skipped).
Writes the "Tokenizer evaluation" report section (one markdown table per baseline).
"""

from nanochat.common import run_script
from nanochat.dataset import get_dataset, parquets_iter_batched
from nanochat.report import get_report
from nanochat.reference_encodings import ReferenceEncodingUnavailable
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

NEWS_TEXT = """Officials in the coastal town of Marrowby confirmed on Tuesday that the harbor bridge, closed since a barge struck one of its supports in March, will reopen to traffic next month. Engineers replaced two damaged pylons and reinforced the deck with steel plating, a repair the county estimates cost $4.2 million, roughly 30% below the figure first announced.

Local businesses, several of which reported losing more than half their weekday customers during the closure, welcomed the news. "We have been counting the days," said Ana Ruiz, who runs a bakery near the eastern ramp. The transport department said pedestrians will be let back on the 14th, with vehicles following after a final load test."""

KOREAN_TEXT = """오늘 아침 시장에는 사람들이 평소보다 훨씬 많았다. 추석을 앞두고 과일과 생선을 사려는 손님들이 줄을 섰고, 상인들은 목소리를 높여 가격을 불렀다. 한 할머니는 사과 한 상자를 들고 웃으며 올해는 비가 적당히 와서 맛이 좋다고 말했다.

시장 골목 끝에 있는 작은 국수집은 점심시간이 되기도 전에 자리가 가득 찼다. 이런 풍경은 해마다 반복되지만, 사람들은 여전히 그 속에서 계절이 바뀌는 것을 느낀다."""

CODE_TEXT = '''from collections import Counter


def most_common_bigrams(words, k=5):
    """Return the k most frequent adjacent word pairs."""
    pairs = Counter(zip(words, words[1:]))
    return [(f"{a} {b}", n) for (a, b), n in pairs.most_common(k)]


class RunningMean:
    def __init__(self):
        self.count, self.total = 0, 0.0

    def update(self, x: float) -> float:
        self.count += 1
        self.total += x
        return self.total / self.count


if __name__ == "__main__":
    text = "the cat sat on the mat and the cat slept"
    print(most_common_bigrams(text.split(), k=3))
    mean = RunningMean()
    print([round(mean.update(v), 2) for v in (3, 1, 4, 1, 5, 9)])
'''

MATH_TEXT = r"""\documentclass{article}
\usepackage{amsmath,amssymb,amsthm}
\newtheorem{theorem}{Theorem}
\begin{document}
\section*{A geometric series}
For $|r| < 1$ the partial sums $S_n = \sum_{k=0}^{n} r^k$ satisfy
\begin{equation}
  S_n - r S_n = 1 - r^{n+1} \quad\Longrightarrow\quad S_n = \frac{1 - r^{n+1}}{1 - r},
\end{equation}
and letting $n \to \infty$ gives $\sum_{k=0}^{\infty} r^k = \frac{1}{1-r}$.
\begin{theorem}[Mean value for integrals]
Let $f\colon[a,b]\to\mathbb{R}$ be continuous. Then some $c \in [a,b]$ has
$\int_a^b f(x)\,dx = f(c)\,(b-a)$.
\end{theorem}
\begin{proof}
On $[a,b]$ we have $m \le f(x) \le M$, hence $m(b-a) \le \int_a^b f \le M(b-a)$, and the
intermediate value theorem gives the point $c$.
\end{proof}
\end{document}
"""

SCIENCE_TEXT = """Photosynthetic organisms convert light into chemical energy through two coupled sets of reactions. In the thylakoid membranes, photosystem II absorbs photons near 680 nm and uses the excitation energy to split water, releasing O2 and feeding electrons into a transport chain that pumps protons across the membrane. The resulting electrochemical gradient drives ATP synthase, while photosystem I re-energizes the electrons to reduce NADP+ to NADPH. In the stroma, the Calvin-Benson cycle spends this ATP and NADPH to fix CO2 via ribulose-1,5-bisphosphate carboxylase/oxygenase (RuBisCO), whose slow turnover (a few reactions per second) and side reaction with O2 make it a long-standing target for crop engineering."""

BASELINES = [("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")]
GREEN, RED, RESET = "\033[92m", "\033[91m", "\033[0m"


def load_eval_texts():
    """[(label, text)]: the fixed samples, then the first row group of each split (skipped if absent)."""
    texts = [("news", NEWS_TEXT), ("korean", KOREAN_TEXT), ("code", CODE_TEXT), ("math", MATH_TEXT),
             ("science", SCIENCE_TEXT)]
    name = get_dataset().name
    for label, split in ((f"{name}-train", "train"), (f"{name}-val", "val")):
        try:
            docs = next(parquets_iter_batched(split=split), None)
        except FileNotFoundError as e:
            print(f"Skipping {label}: {e}")
            continue
        if docs:
            texts.append((label, "\n".join(docs)))
    return texts


def measure(tokenizer, texts):
    """{label: {"bytes", "tokens", "ratio"}}; refuses a tokenizer that does not round-trip."""
    results = {}
    for label, text in texts:
        ids = tokenizer.encode(text)
        if tokenizer.decode(ids) != text:
            raise RuntimeError(f"tokenizer does not round-trip the {label!r} text")
        num_bytes = len(text.encode("utf-8"))
        results[label] = {"bytes": num_bytes, "tokens": len(ids), "ratio": num_bytes / max(len(ids), 1)}
    return results


def relative_diff(baseline, ours):
    """Percent fewer tokens than the baseline (positive = ours compresses better)."""
    return (baseline["tokens"] - ours["tokens"]) / baseline["tokens"] * 100


def paint(text, color):
    return f"{color}{text}{RESET}" if color else text


def print_comparison(baseline_name, baseline_results, our_results):
    print(f"\nComparison with {baseline_name}:")
    print("=" * 99)
    print(f"{'Text Type':<14} {'Bytes':<8} {baseline_name:<15} {'Ours':<15} {'Relative':<12} {'Better':<10}")
    print(f"{'':<14} {'':<8} {'Tokens':<7} {'Ratio':<7} {'Tokens':<7} {'Ratio':<7} {'Diff %':<12}")
    print("-" * 99)
    for label, ours in our_results.items():
        base = baseline_results[label]
        if ours["ratio"] > base["ratio"]:
            base_color, our_color, better = "", GREEN, "Ours"
        elif ours["ratio"] < base["ratio"]:
            base_color, our_color, better = GREEN, RED, baseline_name
        else:
            base_color, our_color, better = "", "", "Tie"
        cells = [paint(f"{base['tokens']:<7}", base_color), paint(f"{base['ratio']:<7.2f}", base_color),
                 paint(f"{ours['tokens']:<7}", our_color), paint(f"{ours['ratio']:<7.2f}", our_color),
                 paint(f"{relative_diff(base, ours):+7.1f}%", our_color)]
        print(f"{label:<14} {ours['bytes']:<8} " + " ".join(cells) + f"     {better:<10}")


def markdown_comparison(baseline_name, baseline_results, our_results):
    lines = [f"### Comparison with {baseline_name}", "",
             f"| Text Type | Bytes | {baseline_name} Tokens | {baseline_name} Ratio | Ours Tokens | Ours Ratio | Relative Diff % |",
             "|-----------|-------|--------------|--------------|-------------|------------|-----------------|"]
    for label, ours in our_results.items():
        base = baseline_results[label]
        lines.append(f"| {label} | {ours['bytes']} | {base['tokens']} | {base['ratio']:.2f} | "
                     f"{ours['tokens']} | {ours['ratio']:.2f} | {relative_diff(base, ours):+.1f}% |")
    return "\n".join(lines) + "\n"


def markdown_ours_only(our_results):
    lines = ["### Our tokenizer", "", "| Text Type | Bytes | Tokens | Ratio |", "|-----------|-------|--------|-------|"]
    lines += [f"| {label} | {r['bytes']} | {r['tokens']} | {r['ratio']:.2f} |" for label, r in our_results.items()]
    return "\n".join(lines) + "\n"


def main():
    texts = load_eval_texts()
    ours = get_tokenizer()
    our_results = measure(ours, texts)
    vocab_sizes = {"Ours": ours.get_vocab_size()}
    baseline_results = {}
    for display_name, tiktoken_name in BASELINES:
        try:
            tokenizer = RustBPETokenizer.from_pretrained(tiktoken_name)
        except ReferenceEncodingUnavailable as e:
            print(f"{display_name} baseline unavailable, skipped: {e}")
            continue
        vocab_sizes[display_name] = tokenizer.get_vocab_size()
        baseline_results[display_name] = measure(tokenizer, texts)

    print("\nVocab sizes:")
    for name, size in vocab_sizes.items():
        print(f"{name}: {size:,}")
    sections = []
    for baseline_name, results in baseline_results.items():
        print_comparison(baseline_name, results, our_results)
        sections.append(markdown_comparison(baseline_name, results, our_results))
    if not baseline_results:
        print("\nOur tokenizer (no baseline to compare with):")
        for label, r in our_results.items():
            print(f"{label:<14} {r['bytes']:<8} {r['tokens']:<7} {r['ratio']:<7.2f}")
        sections.append(markdown_ours_only(our_results))
    get_report().log(section="Tokenizer evaluation", data=sections)


if __name__ == "__main__":
    run_script(main, "tok_eval")
