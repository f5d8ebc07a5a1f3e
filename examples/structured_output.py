"""Structured output, several samples of one prompt, and each token's alternatives.

    python examples/structured_output.py

Runs on the embedded default model: its weights are random, yet the JSON below always parses and fits the schema,
because every token is sampled under the schema's grammar.
"""

import json

import acb
from acb import Engine, SamplingParams
from acb.default_model import load_default

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "population": {"type": "integer", "minimum": 0, "maximum": 40_000_000},
        "tags": {"type": "array", "items": {"enum": ["coastal", "capital", "old"]}, "maxItems": 3},
    },
    "required": ["city", "population", "tags"],
}


async def main() -> None:
    model, tokenizer = load_default()
    async with Engine(model, tokenizer) as engine:
        # one JSON answer
        done = await engine.generate("Describe a city as JSON:", SamplingParams(max_new_tokens=200, json_schema=SCHEMA))
        print("json:", json.loads(done.text))
        # three samples of one prompt, seeded (sample i uses seed + i), sharing the prompt's KV blocks
        params = SamplingParams(max_new_tokens=60, json_schema=SCHEMA, temperature=0.9, seed=1, n=3)
        for i, choice in enumerate(await engine.generate_choices("A city:", params)):
            print(f"sample {i}:", json.loads(choice.text)["city"])
        # the two most likely tokens at each position, with a penalty against repeating tokens
        params = SamplingParams(max_new_tokens=5, top_logprobs=2, frequency_penalty=1.0)
        async for tok in engine.stream("Once upon a time", params):
            alternatives = ", ".join(f"{tokenizer.decode([i])!r} {lp:.2f}" for i, lp in tok.top_logprobs)
            print(f"{tok.text!r:>14} (logprob {tok.logprob:.2f}; top: {alternatives})")


if __name__ == "__main__":
    acb.run(main())
