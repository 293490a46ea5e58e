"""Simulated people for tests and demos: they use a served policy over HTTP as people do on the feedback
pages, and judge what they read by a scoring function plus their own noise.

    people = make_people("envs.builtin:sentiment_reward", {"alice": 0.05, "bob": 0.10}, keys, seed=0)
    async with Population(base_url, people, api_key=key) as population:
        await population.ask(prompts, n=2)          # an application's traffic: each answer pair enters "served"
        await population.label("served")            # A/B labels (and some 1..5 ratings) on /ui/api/labels
        await population.chat(prompts)              # chat turns, each liked, disliked or rated
        await population.judge("ppo_vs_sft")        # a blind study, taking turns (so each two share items)
        await population.judge_open_studies()       # every study not yet complete (a loop round's gate)

The scoring function is a reward spec as `rlhf-ray label --annotator scripted:SPEC` takes (`module:function`
or a reward-model folder; the `scripted:` prefix is accepted). A person's worth of an answer is its score
plus Gaussian noise of their own; they prefer the answer worth more (a tie within `tie_margin`), rate
round(rating_center + rating_slope * worth) clipped to 1..5, and like an answer worth more than
`like_above`. The client is bounded: at most `concurrency` requests at once, each within `timeout_s`, and
at most `max_requests` in all; an HTTP error stops it with the route, status and message.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import httpx

KEY_HEADER = "X-Annotator-Key"


@dataclass
class SimulatedPerson:
    name: str
    key: str  # their annotator key (`rlhf-ray annotators add NAME`)
    score: Callable[[list[str], list[str]], Sequence[float]]  # reward(prompts, responses)
    noise: float = 0.1
    rng: random.Random = field(default_factory=random.Random)
    tie_margin: float = 0.02
    rating_center: float = 3.0
    rating_slope: float = 4.0
    like_above: float = 0.0

    def worth(self, prompt: str, text: str) -> float:
        return float(self.score([prompt], [text])[0]) + self.rng.gauss(0.0, self.noise)

    def choose(self, prompt: str, a: str, b: str) -> str:
        wa, wb = self.worth(prompt, a), self.worth(prompt, b)
        return "tie" if abs(wa - wb) <= self.tie_margin else "A" if wa > wb else "B"

    def rating(self, prompt: str, text: str) -> int:
        return min(5, max(1, round(self.rating_center + self.rating_slope * self.worth(prompt, text))))

    def likes(self, prompt: str, text: str) -> bool:
        return self.worth(prompt, text) > self.like_above


def make_people(score: str, noise: dict[str, float], keys: dict[str, str], seed: int = 0,
                **judgement) -> list[SimulatedPerson]:
    """One person per name of `noise`, with the key of `keys`, judging by the reward spec `score`."""
    from rlhf_ray.rewards.base import as_reward_function

    reward = as_reward_function(score.removeprefix("scripted:"))
    seeds = random.Random(seed)
    return [SimulatedPerson(name, keys[name], reward, sigma, random.Random(seeds.random()), **judgement)
            for name, sigma in noise.items()]


class Population:
    """Simulated people on a served policy's HTTP API and the pages' routes (see the module docstring)."""

    def __init__(self, base_url: str, people: Sequence[SimulatedPerson], api_key: str | None = None,
                 model: str | None = None, concurrency: int = 8, timeout_s: float = 120.0,
                 max_requests: int = 100_000, transport: httpx.AsyncBaseTransport | None = None):
        self.people, self.model, self.api_key = list(people), model, api_key
        self.gate, self.max_requests, self.requests = asyncio.Semaphore(concurrency), max_requests, 0
        self.client = httpx.AsyncClient(base_url=base_url, timeout=timeout_s, transport=transport)
        self.rng = random.Random(0)

    async def __aenter__(self) -> "Population":
        if self.model is None:
            self.model = (await self._call("GET", "/v1/models", self._auth()))["data"][0]["id"]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()

    def _auth(self, person: SimulatedPerson | None = None) -> dict:
        if person is not None:
            return {KEY_HEADER: person.key}
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _call(self, method: str, path: str, headers: dict, allow: tuple[int, ...] = (), **kwargs):
        """The JSON of a 200 answer, None for a status in `allow`; RuntimeError for any other."""
        if self.requests >= self.max_requests:
            raise RuntimeError(f"the population's bound of {self.max_requests} requests is spent")
        self.requests += 1
        async with self.gate:
            response = await self.client.request(method, path, headers=headers, **kwargs)
        if response.status_code in allow:
            return None
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")
        return response.json()

    async def ask(self, prompts: Sequence[str], n: int = 2, max_tokens: int = 16, seed: int = 0,
                  chat: bool = False) -> list[dict]:
        """Completions of `prompts` with `n` choices each (n >= 2 fills the "served" labelling queue); with
        `chat`, each prompt is a user message to /v1/chat/completions (an instruct model's template)."""
        def body(i: int, prompt: str) -> dict:
            text = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
            return {"model": self.model, **text, "n": n, "max_tokens": max_tokens, "seed": seed + i}

        path = "/v1/chat/completions" if chat else "/v1/completions"
        return await asyncio.gather(*(self._call("POST", path, self._auth(), json=body(i, prompt))
                                      for i, prompt in enumerate(prompts)))

    async def _labels(self, person: SimulatedPerson, queue: str, rate: float) -> int:
        done = 0
        while True:
            item = (await self._call("GET", "/ui/api/next", self._auth(person), params={"queue": queue}))["item"]
            if item is None:
                return done
            prompt, a, b = item["prompt"], item["response_a"], item["response_b"]
            body = {"queue": queue, "item_id": item["id"], "choice": person.choose(prompt, a, b)}
            if person.rng.random() < rate:
                body.update(rating_a=person.rating(prompt, a), rating_b=person.rating(prompt, b))
            # 409: another person gave the item its last label meanwhile
            done += await self._call("POST", "/ui/api/labels", self._auth(person), allow=(409,), json=body) is not None

    async def label(self, queue: str = "served", rate: float = 0.5) -> int:
        """Everyone labels `queue` at once until nothing is left for them; each rates both answers of a share
        `rate` of the items. Returns the labels given."""
        return sum(await asyncio.gather(*(self._labels(person, queue, rate) for person in self.people)))

    async def chat(self, prompts: Sequence[str], max_tokens: int = 16, rate: float = 0.5) -> dict[str, int]:
        """One chat turn per prompt, the people taking turns; each answer is rated (share `rate`) or liked
        or disliked. Returns the counts of ratings and likes."""
        counts = {"ratings": 0, "likes": 0}

        async def turn(person: SimulatedPerson, prompt: str) -> None:
            answer = await self._call("POST", "/ui/api/chat", self._auth(person), json={
                "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})
            text = answer["choices"][0]["message"]["content"]
            if person.rng.random() < rate:
                feedback, kind = {"rating": person.rating(prompt, text)}, "ratings"
            else:
                feedback, kind = {"like": person.likes(prompt, text)}, "likes"
            await self._call("POST", "/ui/api/feedback", self._auth(person),
                             json={"completion_id": answer["id"], **feedback})
            counts[kind] += 1

        await asyncio.gather(*(turn(self.people[i % len(self.people)], p) for i, p in enumerate(prompts)))
        return counts

    async def judge(self, study: str) -> int:
        """The people judge a blind study in turns, one item each per turn, until none is left for anyone
        (so every two of them share items, for Cohen's kappa). Returns the judgements given."""
        done, waiting = 0, list(self.people)
        while waiting:
            for person in list(waiting):
                item = (await self._call("GET", "/ui/api/next", self._auth(person), params={"queue": study}))["item"]
                if item is None:
                    waiting.remove(person)
                    continue
                await self._call("POST", "/ui/api/labels", self._auth(person), json={
                    "queue": study, "item_id": item["id"],
                    "choice": person.choose(item["prompt"], item["response_a"], item["response_b"])})
                done += 1
        return done

    async def open_studies(self) -> list[str]:
        """The blind studies on the server with items still to judge."""
        me = await self._call("GET", "/ui/api/me", self._auth(self.people[0]))
        return [q["name"] for q in me["queues"] if q["source"] == "study" and q["done"] < q["items"]]

    async def judge_open_studies(self) -> int:
        """Judge every open study (as `judge`); the judgements given."""
        return sum([await self.judge(name) for name in await self.open_studies()])
