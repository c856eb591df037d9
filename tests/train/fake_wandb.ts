/**
 * A local stand-in for the two W&B endpoints the tracking client uses (`POST /graphql` with the
 * Viewer query and the upsertBucket mutation, `POST /files/{entity}/{project}/{run}/file_stream`).
 * It records every request and keeps each run's history and summary files as W&B does: lines
 * written at their offset (a repeated offset overwrites), so duplicated steps would show.
 */

export interface ReceivedRequest {
  path: string;
  authorization: string | null;
  body: Record<string, unknown>;
}

interface FileChunk {
  offset: number;
  content: string[];
}

export interface FakeRun {
  upserts: Record<string, unknown>[];
  history: string[];
  summary: string[];
  complete?: { exitcode: number };
}

export type Failure = "500" | "drop";

export class FakeWandb {
  readonly requests: ReceivedRequest[] = [];
  readonly runs = new Map<string, FakeRun>();
  /** What to do to the next requests instead of answering them, first one first. */
  readonly failures: Failure[] = [];
  private readonly server: Deno.HttpServer<Deno.NetAddr>;

  /** Accepts `apiKey` only (HTTP Basic, user "api"); other keys get 401. */
  constructor(readonly apiKey: string, readonly entity = "fake-entity") {
    this.server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen() {} },
      (request) => this.handle(request),
    );
  }

  get baseUrl(): string {
    return `http://127.0.0.1:${this.server.addr.port}`;
  }

  /** The one run the tests log to. */
  run(id: string): FakeRun {
    const run = this.runs.get(id);
    if (!run) throw new Error(`no run ${id}; runs: ${[...this.runs.keys()].join(", ")}`);
    return run;
  }

  /** File-stream requests received, in order. */
  get streams(): ReceivedRequest[] {
    return this.requests.filter((r) => r.path.endsWith("/file_stream"));
  }

  close(): Promise<void> {
    return this.server.shutdown();
  }

  private runOf(id: string): FakeRun {
    let run = this.runs.get(id);
    if (!run) this.runs.set(id, run = { upserts: [], history: [], summary: [] });
    return run;
  }

  private async handle(request: Request): Promise<Response> {
    const path = new URL(request.url).pathname;
    const failure = this.failures.shift();
    if (failure === "drop") {
      // The connection breaks mid-reply: the client sees a network error, not a status.
      return new Response(new ReadableStream({ start: (c) => c.error(new Error("dropped")) }));
    }
    if (failure === "500") return new Response("overloaded", { status: 500 });
    if (request.headers.get("authorization") !== "Basic " + btoa(`api:${this.apiKey}`)) {
      return new Response("unauthorized", { status: 401 });
    }
    const body = await request.json() as Record<string, unknown>;
    this.requests.push({ path, authorization: request.headers.get("authorization"), body });
    if (path === "/graphql") {
      const query = String(body.query);
      const variables = body.variables as Record<string, unknown>;
      if (query.includes("viewer")) {
        return Response.json({ data: { viewer: { id: "u1", entity: this.entity } } });
      }
      const run = this.runOf(String(variables.name));
      run.upserts.push(variables);
      return Response.json({
        data: {
          upsertBucket: {
            bucket: { id: "b1", name: variables.name, historyLineCount: run.history.length },
            inserted: run.upserts.length === 1,
          },
        },
      });
    }
    const match = path.match(/^\/files\/([^/]+)\/([^/]+)\/([^/]+)\/file_stream$/);
    if (!match) return new Response("not found", { status: 404 });
    const run = this.runOf(match[3]);
    const files = body.files as Record<string, FileChunk>;
    for (const [name, chunk] of Object.entries(files ?? {})) {
      const lines = name === "wandb-history.jsonl" ? run.history : run.summary;
      chunk.content.forEach((line, i) => lines[chunk.offset + i] = line);
    }
    if (body.complete) run.complete = { exitcode: body.exitcode as number };
    return Response.json({ exitcode: null, limits: {} });
  }
}

/** Parses a history or summary line the way W&B does (NaN and Infinity allowed). */
export function parseWandbLine(line: string): Record<string, unknown> {
  return JSON.parse(line.replace(/\b(-?Infinity|NaN)\b/g, '"$1"'));
}
