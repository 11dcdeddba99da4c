"""An unmodified Agents SDK agent, as a customer would write it: it reads OPENAI_* from the environment."""

from __future__ import annotations

from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
)
from openai import AsyncOpenAI


@function_tool
def get_weather(city: str) -> str:
    """Return the weather for a city."""
    return f"sunny in {city}"


def build_agent(api: str) -> Agent:
    client = AsyncOpenAI()  # OPENAI_BASE_URL / OPENAI_API_KEY / HTTPS_PROXY / SSL_CERT_FILE from the environment
    model = (
        OpenAIResponsesModel(model="gpt-test", openai_client=client)
        if api == "responses"
        else OpenAIChatCompletionsModel(model="gpt-test", openai_client=client)
    )
    return Agent(name="weather", instructions="Answer with the weather tool.", model=model, tools=[get_weather])


RUN_CONFIG = RunConfig(tracing_disabled=True)


async def run_agent(api: str, prompt: str = "What is the weather in Paris?") -> str:
    result = await Runner.run(build_agent(api), prompt, run_config=RUN_CONFIG)
    return str(result.final_output)


async def run_agent_streamed(api: str, prompt: str = "What is the weather in Paris?") -> tuple[str, list[str]]:
    """The final output and the text deltas as they arrived."""
    result = Runner.run_streamed(build_agent(api), prompt, run_config=RUN_CONFIG)
    deltas = []
    async for event in result.stream_events():
        if event.type == "raw_response_event" and getattr(event.data, "type", "") == "response.output_text.delta":
            deltas.append(event.data.delta)
    return str(result.final_output), deltas
