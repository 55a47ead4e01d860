/**
 * What the WebSocket session tests share: the frames a raw host's socket receives, read one
 * at a time in order, as the plugin sent them.
 */
import type { RawData, WebSocket } from 'ws';

export type Frame = { type: string; id?: number; [key: string]: unknown };

/** The frames `socket` receives, one at a time, in order. */
export class Frames {
  private readonly queue: Frame[] = [];
  private waiter: (() => void) | undefined;

  constructor(socket: WebSocket) {
    socket.on('message', (data: RawData) => {
      this.queue.push(JSON.parse(data.toString()) as Frame);
      this.waiter?.();
    });
  }

  async next(): Promise<Frame> {
    while (this.queue.length === 0) await new Promise<void>((resolve) => (this.waiter = resolve));
    return this.queue.shift() as Frame;
  }

  /** The next frame of type `type` (for `id`), skipping the others. */
  async nextOf(type: string, id?: number): Promise<Frame> {
    for (;;) {
      const frame = await this.next();
      if (frame.type === type && (id === undefined || frame.id === id)) return frame;
    }
  }

  /** The frames of call `id` up to its response, which is last. */
  async until(id: number): Promise<Frame[]> {
    const seen: Frame[] = [];
    for (;;) {
      const frame = await this.next();
      if (frame.id !== id) continue;
      seen.push(frame);
      if (frame.type === 'response') return seen;
    }
  }
}
