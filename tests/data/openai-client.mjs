// Drives `engine serve` with the official openai client: node openai-client.mjs BASE_URL API_KEY PNG_PATH BIG_PNG_PATH
// Prints one JSON object with what each scenario saw; ServeTests asserts on it. Loopback only, bounded in count and time.
import fs from 'node:fs';
import OpenAI from 'openai';

const [baseURL, apiKey, pngPath, bigPngPath] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120_000 });
const models = await client.models.list();
const model = models.data[0].id;
const out = { model };
const user = (content) => [{ role: 'user', content }];
const dataUrl = (path) => 'data:image/png;base64,' + fs.readFileSync(path).toString('base64');

// A plain completion and the same request streamed (one seed: the same text).
const plain = await client.chat.completions.create({ model, messages: user('What is 2+3?'), max_tokens: 12, seed: 7, temperature: 0.8 });
const m = plain.choices[0].message;
out.plain = { text: (m.reasoning_content ?? '') + (m.content ?? ''), finish: plain.choices[0].finish_reason, usage: plain.usage, object: plain.object };

const stream = await client.chat.completions.create({ model, messages: user('What is 2+3?'), max_tokens: 12, seed: 7, temperature: 0.8, stream: true,
  stream_options: { include_usage: true } });
let streamed = '', chunks = 0, finish = null, usage = null, role = null;
for await (const chunk of stream) {
  chunks++;
  if (chunk.usage) usage = chunk.usage;
  for (const c of chunk.choices) {
    if (c.delta.role) role = c.delta.role;
    streamed += (c.delta.reasoning_content ?? '') + (c.delta.content ?? '');
    if (c.finish_reason) finish = c.finish_reason;
  }
}
out.stream = { text: streamed, chunks, finish, usage, role };

// An image message (a data URL), n = 3, and a text completion.
const image = await client.chat.completions.create({ model, max_tokens: 6, seed: 3, messages: [{ role: 'user', content: [
  { type: 'text', text: 'What digit is this?' }, { type: 'image_url', image_url: { url: dataUrl(pngPath) } }] }] });
out.image = { promptTokens: image.usage.prompt_tokens, finish: image.choices[0].finish_reason };
const textOnly = await client.chat.completions.create({ model, max_tokens: 6, seed: 3, messages: user('What digit is this?') });
out.image.textOnlyPromptTokens = textOnly.usage.prompt_tokens;

const three = await client.chat.completions.create({ model, messages: user('Count.'), max_tokens: 5, n: 3, seed: 11, temperature: 1.0 });
out.n3 = { choices: three.choices.map(c => ({ index: c.index, text: (c.message.reasoning_content ?? '') + (c.message.content ?? '') })), usage: three.usage };

const completion = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 5, seed: 2 });
out.completion = { object: completion.object, text: completion.choices[0].text, usage: completion.usage };

// Errors: each an APIError with a status and the field it names.
async function error(request) {
  try { await request(); return { status: 200 }; }
  catch (e) { return { status: e.status ?? null, param: e.param ?? e.error?.param ?? null, message: e.message }; }
}
out.errors = {
  role: await error(() => client.chat.completions.create({ model, messages: [{ role: 'robot', content: 'hi' }] })),
  temperature: await error(() => client.chat.completions.create({ model, messages: user('hi'), temperature: 3 })),
  topP: await error(() => client.chat.completions.create({ model, messages: user('hi'), top_p: 0 })),
  n: await error(() => client.chat.completions.create({ model, messages: user('hi'), n: 1000 })),
  maxTokens: await error(() => client.chat.completions.create({ model, messages: user('hi'), max_tokens: 0 })),
  promptTooLong: await error(() => client.chat.completions.create({ model, messages: user('word '.repeat(400)) })),
  tooManyImages: await error(() => client.chat.completions.create({ model, messages: [{ role: 'user', content: [
    { type: 'image_url', image_url: { url: dataUrl(pngPath) } }, { type: 'image_url', image_url: { url: dataUrl(pngPath) } }] }] })),
  imageTooBig: await error(() => client.chat.completions.create({ model, messages: [{ role: 'user', content: [
    { type: 'image_url', image_url: { url: dataUrl(bigPngPath) } }] }] })),
  networkImage: await error(() => client.chat.completions.create({ model, messages: [{ role: 'user', content: [
    { type: 'image_url', image_url: { url: 'https://example.com/cat.png' } }] }] })),
  unknownModel: await error(() => client.chat.completions.create({ model: 'gpt-nothing', messages: user('hi') })),
  badKey: await error(() => new OpenAI({ baseURL, apiKey: 'wrong', maxRetries: 0 }).chat.completions.create({ model, messages: user('hi') })),
};
const malformed = await fetch(baseURL + '/chat/completions', { method: 'POST', headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' }, body: '{"model": ' });
out.errors.malformed = { status: malformed.status, body: await malformed.json() };

// Load: 32 concurrent streaming requests of mixed lengths, every fourth cancelled after its second chunk. Each seeded
// request is also run alone first; a finished request must give the text it gives alone.
const spec = Array.from({ length: 32 }, (_, i) => ({ seed: 100 + i, max_tokens: 4 + (i * 7) % 20, cancel: i % 4 === 3, prompt: `Request ${i}: say something.` }));
async function run(s, cancel) {
  const controller = new AbortController();
  const st = await client.chat.completions.create({ model, messages: user(s.prompt), max_tokens: s.max_tokens, seed: s.seed, temperature: 0.9, stream: true,
    stream_options: { include_usage: true } }, { signal: controller.signal });
  let text = '', n = 0, fin = null, tokens = null;
  try {
    for await (const chunk of st) {
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const c of chunk.choices) { text += (c.delta.reasoning_content ?? '') + (c.delta.content ?? ''); if (c.finish_reason) fin = c.finish_reason; }
      if (cancel && ++n === 2) { controller.abort(); break; }
    }
  } catch (e) { if (!cancel) throw e; }
  return { text, finish: fin, tokens, cancelled: cancel };
}
const alone = [];
for (const s of spec) alone.push(await run(s, false));
const started = Date.now();
const together = await Promise.all(spec.map(s => run(s, s.cancel)));
out.load = {
  seconds: (Date.now() - started) / 1000,
  completed: together.filter(r => !r.cancelled && r.finish !== null).length,
  cancelled: together.filter(r => r.cancelled).length,
  mismatches: together.map((r, i) => (!r.cancelled && (r.text !== alone[i].text || r.tokens !== alone[i].tokens)) ? i : -1).filter(i => i >= 0),
  aloneTokens: alone.reduce((a, r) => a + r.tokens, 0),
};
console.log(JSON.stringify(out));
