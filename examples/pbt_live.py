"""Population-based training on one machine, two ways, with the same rule:

- live: each member is one `examples/pbt_trainer.py` process for the whole run. At every
  round boundary (step K*r) it pauses (PauseTraining queued at exactly that step), the
  controller ranks the members by their evaluation loss (GetState's epoch_metrics), each
  member of the bottom quantile loads a top member's checkpoint (SaveCheckpoint on the
  donor, then LoadCheckpoint) and takes the donor's hyperparameters perturbed
  (SetLearningRate, SetOptimizerParameters for momentum), and all resume. Only lrctl calls:
  no process is restarted.
- restart (what Ray Tune does): every member's process runs to the round's end and exits
  with a checkpoint; the next round starts a new process per member, from its own
  checkpoint, or for an exploited member from the donor's (`--start-from`), with the new
  hyperparameters on its command line. Every member restarts at every round, as in Ray
  Tune's synchronous PBT, whose PAUSE checkpoints a trial and stops its actor
  (`reuse_actors=False`); each restart pays the process start, TensorFlow's import, the
  graph trace and the input pipeline's warm-up.

Both share the population (initial learning rates and momenta drawn from `--seed`), the
ranking, the exploit rule (the bottom `--quantile` copies a member of the top quantile,
Ray Tune's default 0.25) and the explore rule (each hyperparameter times 0.8 or 1.2, drawn
from the same seeded RNG; momentum capped at 0.99).

    python examples/pbt_live.py --mode live --population 4 --rounds 4 --interval 50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from lrctl.client import TrainingControlClient

TRAINER = Path(__file__).resolve().parent / "pbt_trainer.py"
FACTORS = (0.8, 1.2)
MAX_MOMENTUM = 0.99
LIMIT = 600.0  # seconds: a safety limit for a hung member, never a timing check


@dataclasses.dataclass(frozen=True)
class Hyper:
    learning_rate: float
    momentum: float


@dataclasses.dataclass(frozen=True)
class Exploit:
    loser: int
    donor: int
    config: Hyper


def initial_population(size: int, seed: int) -> list[Hyper]:
    rng = random.Random(seed)
    return [Hyper(learning_rate=10 ** rng.uniform(-2.5, -0.7), momentum=rng.uniform(0.5, 0.95))
            for _ in range(size)]


def explore(rng: random.Random, config: Hyper) -> Hyper:
    return Hyper(learning_rate=config.learning_rate * rng.choice(FACTORS),
                 momentum=min(MAX_MOMENTUM, config.momentum * rng.choice(FACTORS)))


def plan_round(rng: random.Random, losses: Sequence[float], configs: Sequence[Hyper],
               quantile: float) -> list[Exploit]:
    """Who copies whom, and with which new hyperparameters: each member of the bottom
    quantile (at least one, at most half) copies a random member of the top quantile and
    perturbs its config. A NaN loss ranks last. Draws from `rng` in a fixed order."""
    ranked = sorted(range(len(losses)), key=lambda i: (not math.isfinite(losses[i]), losses[i], i))
    count = min(len(ranked) // 2, max(1, math.ceil(len(ranked) * quantile)))
    top, bottom = ranked[:count], ranked[len(ranked) - count:]
    plan = []
    for loser in bottom:
        donor = rng.choice(top)
        plan.append(Exploit(loser, donor, explore(rng, configs[donor])))
    return plan


class Member:
    """One trainer process; its `PBT {json}` event lines are collected as they arrive."""

    def __init__(self, index: int, config: Hyper, *, steps: int, interval: int, root: Path,
                 start_from: Path | None = None, wait_for_stdin: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.index = index
        self.directory = root / f"member-{index}"
        command = [sys.executable, str(TRAINER), "--learning-rate", repr(config.learning_rate),
                   "--momentum", repr(config.momentum), "--steps", str(steps),
                   "--eval-every", str(interval), "--checkpoint-dir", str(self.directory),
                   "--checkpoint-root", str(root), "--seed", str(index), "--run-id", f"member-{index}"]
        if start_from is not None:
            command += ["--start-from", str(start_from)]
        if wait_for_stdin:
            command.append("--wait-for-stdin")
        self.spawned = time.time()
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE if wait_for_stdin else subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=env)
        self.events: list[dict[str, Any]] = []
        self.log: list[str] = []
        self.port: int | None = None
        self.exited: float | None = None
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stream: IO[str] | None = self.process.stderr
        assert stream is not None
        for line in stream:
            with self._changed:
                self.log.append(line)
                if line.startswith("PBT "):
                    self.events.append(json.loads(line[4:]))
                elif (match := re.search(r"control server on port (\d+)", line)) and self.port is None:
                    self.port = int(match.group(1))
                self._changed.notify_all()
        self.process.wait()
        with self._changed:
            self.exited = time.time()
            self._changed.notify_all()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_for(self, name: str, **fields: Any) -> dict[str, Any]:
        """The first event `name` with these fields; AssertionError if the process ends first."""
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events if e["event"] == name
                         and all(e.get(k) == v for k, v in fields.items())), None)

        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None or self.exited is not None, LIMIT):
                raise AssertionError(f"member {self.index}: no {name} {fields} in {LIMIT} s")
            event = found()
        if event is None:
            raise AssertionError(f"member {self.index} exited ({self.process.returncode}) before "
                                 f"{name} {fields}:\n{''.join(self.log[-30:])}")
        return event

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def finish(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.exited is not None, LIMIT)
        if self.process.returncode != 0:
            raise AssertionError(f"member {self.index} exited {self.process.returncode}:\n"
                                 f"{''.join(self.log[-30:])}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def loss_at(self, step: int) -> float:
        return float(self.wait_for("eval", step=step)["val_loss"])


@dataclasses.dataclass
class Outcome:
    """What one PBT run did: its wall time, each member's final loss and config, the
    exploits of each round, and the processes (with their events) for the cost split."""
    mode: str
    wall_s: float
    final_losses: list[float]
    configs: list[Hyper]
    rounds: list[list[Exploit]]
    incarnations: list[Member]
    resumed: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)

    @property
    def best_loss(self) -> float:
        return min(self.final_losses)


def run_live(population: int, rounds: int, interval: int, seed: int, quantile: float, root: Path,
             env: dict[str, str] | None = None, log: IO[str] = sys.stderr) -> Outcome:
    rng = random.Random(seed + 1)
    configs = initial_population(population, seed)
    total = rounds * interval
    started = time.time()
    members = [Member(i, c, steps=total, interval=interval, root=root, wait_for_stdin=True, env=env)
               for i, c in enumerate(configs)]
    clients: list[TrainingControlClient] = []
    plans: list[list[Exploit]] = []
    resumed: dict[tuple[int, int], float] = {}
    try:
        for member in members:
            member.wait_for("ready")
        clients = [TrainingControlClient(m.target, timeout=LIMIT) for m in members]
        pauses = [c.pause_training(apply_at_step=interval) for c in clients] if rounds > 1 else []
        for member in members:
            member.go()
        for round_ in range(1, rounds):
            boundary = round_ * interval
            for client, pause in zip(clients, pauses, strict=True):
                client.wait_change(pause.name, timeout=LIMIT)
            losses = [_ranked_loss(client, boundary) for client in clients]
            plan = plan_round(rng, losses, configs, quantile)
            saved: dict[int, str] = {}
            for exploit in plan:
                if exploit.donor not in saved:  # one checkpoint per donor and round
                    saved[exploit.donor] = clients[exploit.donor].save_checkpoint(
                        wait=True, reason=f"pbt round {round_}: donor").checkpoint_path
                loser = clients[exploit.loser]
                reason = f"pbt round {round_}: exploit member {exploit.donor}"
                loser.load_checkpoint(saved[exploit.donor], wait=True, reason=reason)
                loser.set_learning_rate(exploit.config.learning_rate, wait=True, reason=reason)
                loser.set_optimizer_parameters({"momentum": exploit.config.momentum},
                                               wait=True, reason=reason)
                configs[exploit.loser] = exploit.config
            plans.append(plan)
            _print_round(log, "live", round_, losses, plan)
            pauses = [c.pause_training(apply_at_step=boundary + interval) for c in clients] \
                if round_ + 1 < rounds else []
            for i, client in enumerate(clients):
                client.resume_training(wait=True)
                resumed[(i, round_)] = time.time()
        for member in members:
            member.finish()
    finally:
        for client in clients:
            client.close()
        for member in members:
            member.kill()
    final = [m.loss_at(total) for m in members]
    return Outcome("live", max(m.exited or 0.0 for m in members) - started, final, configs, plans,
                   members, resumed)


def _ranked_loss(client: TrainingControlClient, boundary: int) -> float:
    """The member's evaluation loss at `boundary`, read through lrctl."""
    state = client.get_state(view="basic")
    if state.epoch_metrics_step != boundary or "val_loss" not in state.epoch_metrics:
        raise AssertionError(f"{client.target}: epoch metrics of step {state.epoch_metrics_step}, "
                             f"not {boundary}: {dict(state.epoch_metrics)}")
    return float(state.epoch_metrics["val_loss"])


def run_restart(population: int, rounds: int, interval: int, seed: int, quantile: float, root: Path,
                env: dict[str, str] | None = None, log: IO[str] = sys.stderr) -> Outcome:
    rng = random.Random(seed + 1)
    configs = initial_population(population, seed)
    started = time.time()
    sources: list[Path | None] = [None] * population
    plans: list[list[Exploit]] = []
    incarnations: list[Member] = []
    members: list[Member] = []
    losses: list[float] = []
    try:
        for round_ in range(1, rounds + 1):
            boundary = round_ * interval
            members = [Member(i, configs[i], steps=boundary, interval=interval, root=root,
                              start_from=sources[i], env=env) for i in range(population)]
            incarnations += members
            for member in members:
                member.finish()
            losses = [m.loss_at(boundary) for m in members]
            if round_ == rounds:
                break
            plan = plan_round(rng, losses, configs, quantile)
            sources = [None] * population
            for exploit in plan:
                sources[exploit.loser] = members[exploit.donor].directory
                configs[exploit.loser] = exploit.config
            plans.append(plan)
            _print_round(log, "restart", round_, losses, plan)
    finally:
        for member in members:
            member.kill()
    return Outcome("restart", max(m.exited or 0.0 for m in members) - started, losses, configs, plans,
                   incarnations)


def _print_round(log: IO[str], mode: str, round_: int, losses: Sequence[float], plan: Sequence[Exploit]) -> None:
    moves = "; ".join(f"{e.loser} <- {e.donor} (lr {e.config.learning_rate:.4g}, momentum "
                      f"{e.config.momentum:.3g})" for e in plan)
    print(f"{mode} round {round_}: losses {[round(x, 4) for x in losses]}; {moves}", file=log, flush=True)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("live", "restart"), default="live")
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of --interval steps")
    parser.add_argument("--interval", type=int, default=50, help="steps per round (K)")
    parser.add_argument("--quantile", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/lrctl-pbt", help="the members' checkpoints")
    args = parser.parse_args(argv)
    if args.population < 2 or args.rounds < 1 or args.interval < 1:
        parser.error("--population must be >= 2, --rounds and --interval >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    root = Path(args.workdir).resolve() / args.mode
    shutil.rmtree(root, ignore_errors=True)  # a member resumes whatever its folder holds
    root.mkdir(parents=True)
    run = run_live if args.mode == "live" else run_restart
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    outcome = run(args.population, args.rounds, args.interval, args.seed, args.quantile, root, env=env)
    print(json.dumps({"mode": outcome.mode, "wall_s": round(outcome.wall_s, 2),
                      "best_loss": outcome.best_loss, "final_losses": outcome.final_losses,
                      "configs": [dataclasses.asdict(c) for c in outcome.configs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
