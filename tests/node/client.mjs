// Drive an mlxd service with the official OpenAI Node SDK; print the result as JSON.
// usage: node client.mjs BASE_URL '{"kind": "embeddings" | "chat", ...request}'
import OpenAI from "openai";

const [baseURL, raw] = process.argv.slice(2);
const { kind, ...request } = JSON.parse(raw);
const client = new OpenAI({ baseURL, apiKey: "anything", maxRetries: 0 });

async function main() {
  if (kind === "embeddings") {
    const result = await client.embeddings.create(request);
    return { data: result.data.map((d) => Array.from(d.embedding)), usage: result.usage };
  }
  if (kind === "chat" && request.stream) {
    const stream = await client.chat.completions.create(request);
    let content = "";
    let finish = null;
    let usage = null;
    for await (const chunk of stream) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        content += choice.delta?.content ?? "";
        finish = choice.finish_reason ?? finish;
      }
    }
    return { content, finish_reason: finish, usage };
  }
  if (kind === "chat") {
    const reply = await client.chat.completions.create(request);
    const choice = reply.choices[0];
    return { content: choice.message.content, finish_reason: choice.finish_reason, usage: reply.usage };
  }
  throw new Error(`unknown kind ${kind}`);
}

main().then(
  (out) => console.log(JSON.stringify(out)),
  (err) => {
    console.error(String(err));
    process.exit(1);
  },
);
