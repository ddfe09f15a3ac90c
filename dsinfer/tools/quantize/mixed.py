"""Mixed precision: choose 4, 8 or 16 bits per unit to minimise the summed calibration output error under a
budget of bits per weight (scales included)."""


def bits_per_weight(bits: int, group_size: int) -> float:
    return 16.0 if bits == 16 else bits + 16 / group_size  # one fp16 scale per group


def choose_bits(sizes: dict[str, int], errors: dict[str, dict[int, float]], groups: dict[str, int],
                target: float) -> dict[str, int]:
    """sizes: unit -> weights; errors: unit -> {4: e, 8: e} (16 bits has no error). Minimises sum e under
    sum bits <= target * sum sizes: a Lagrangian sweep (each unit takes argmin e + lam * bits), then the
    cheapest remaining upgrades by error saved per bit while they fit."""
    budget = target * sum(sizes.values())
    cost = lambda u, b: sizes[u] * bits_per_weight(b, groups[u])
    err = lambda u, b: 0.0 if b == 16 else errors[u][b]

    def pick(lam: float) -> dict[str, int]:
        return {u: min((4, 8, 16), key=lambda b: err(u, b) + lam * cost(u, b)) for u in sizes}

    if sum(cost(u, 4) for u in sizes) > budget:
        raise ValueError(f"--target-bits {target} is below what 4 bits everywhere needs "
                         f"({sum(cost(u, 4) for u in sizes) / sum(sizes.values()):.3f} bits per weight)")
    lo, hi = -40.0, 40.0  # log10 of lambda
    for _ in range(80):
        mid = (lo + hi) / 2
        choice = pick(10 ** mid)
        lo, hi = (lo, mid) if sum(cost(u, b) for u, b in choice.items()) > budget else (mid, hi)
    choice = pick(10 ** hi)
    return _fill(choice, budget, cost, err)


def _fill(choice: dict[str, int], budget: float, cost, err) -> dict[str, int]:
    used = sum(cost(u, b) for u, b in choice.items())
    while True:
        best, gain = None, 0.0
        for u, b in choice.items():
            for nb in (8, 16):
                extra = cost(u, nb) - cost(u, b)
                if nb > b and used + extra <= budget and extra > 0:
                    g = (err(u, b) - err(u, nb)) / extra
                    if g > gain:
                        best, gain = (u, nb, extra), g
        if best is None:
            return choice
        choice[best[0]] = best[1]
        used += best[2]


def table(sizes, errors, choice, groups) -> str:
    """The per-unit choice as a text table, with the average bits per weight at the end."""
    lines = [f"{'unit':58} {'weights':>11} {'err@4':>10} {'err@8':>10} {'bits':>4}"]
    for u, n in sizes.items():
        lines.append(f"{u:58} {n:>11,} {errors[u][4]:>10.3g} {errors[u][8]:>10.3g} {choice[u]:>4}")
    total = sum(sizes.values())
    avg = sum(n * bits_per_weight(choice[u], groups[u]) for u, n in sizes.items()) / total
    lines.append(f"average {avg:.3f} bits per weight over {total:,} weights "
                 f"(total error {sum(0 if choice[u] == 16 else errors[u][choice[u]] for u in sizes):.4g})")
    return "\n".join(lines)
