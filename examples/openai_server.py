"""Serving acb over the OpenAI API and talking to it with the official ``openai`` client.

Starts the server in this process on a free loopback port, streams a chat completion, asks for a plain
completion, and shuts down. In production you would run ``acb serve --model PATH`` and point clients at it.

    pip install "acb[server]" openai
    python examples/openai_server.py
"""

import asyncio

import uvicorn
from openai import AsyncOpenAI

import acb
from acb import Engine
from acb.default_model import load_default
from acb.serving import create_app


async def main() -> None:
    async with Engine(*load_default()) as engine:
        config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

        print("chat (streamed): ", end="")
        stream = await client.chat.completions.create(
            model="acb-default", messages=[{"role": "user", "content": "Say hello"}], max_tokens=20, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
        done = await client.completions.create(model="acb-default", prompt="The capital of France is", max_tokens=8)
        print("completion:", repr(done.choices[0].text), "| usage:", done.usage.total_tokens, "tokens")
        await client.close()
        server.should_exit = True
        await serving


if __name__ == "__main__":
    acb.run(main())
