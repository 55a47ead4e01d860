/**
 * The hosts attached to a plugin service at once (docs/protocol.md, "Several hosts on one
 * service"): the replicas of a dispatcher, or one dispatcher and the next in a rolling
 * restart. Each names itself with the `linchkit-host` metadata on lifecycle RPCs; the
 * plugin's stop and destroy hooks run only when the last of them leaves, so no host's `Stop`
 * runs under another's calls. RPCs without it count as one host whose id is "".
 *
 * grpc-js runs every handler on the one event loop: each method below runs whole, no lock.
 */
import type * as grpc from '@grpc/grpc-js';

/** The metadata a host names itself with on Init, Start, Stop and Destroy. */
export const HOST_METADATA = 'linchkit-host';
/** The most hosts a service tracks: an `Init` from one more is refused. */
export const MAX_HOSTS = 1024;

const HOST_ID = /^[A-Za-z0-9._-]{1,64}$/;

/** Why a host id was refused; the message does not quote it. */
export class BadHostId extends Error {
  constructor() {
    super(`${HOST_METADATA} must be 1-64 of A-Z a-z 0-9 . _ -`);
    this.name = 'BadHostId';
  }
}

/** The calling host's id, "" when it sent none; throws `BadHostId` for one off the contract. */
export function hostOf(metadata: grpc.Metadata): string {
  const values = metadata.get(HOST_METADATA);
  if (values.length === 0) return '';
  const value = values[0];
  if (typeof value === 'string' && HOST_ID.test(value)) return value;
  throw new BadHostId();
}

/**
 * Hosts whose `Init` succeeded and that have not sent `Stop` or `Destroy` since. A host
 * whose `Init` is running (its hook awaits) holds a place already, so Inits of new hosts
 * arriving together cannot push the set past `MAX_HOSTS`.
 */
export class AttachedHosts {
  private readonly hosts = new Set<string>();
  /** Inits running now, by host. */
  private readonly joining = new Map<string, number>();

  /** Hold a place for `host` while its `Init` runs; false when there is none. Every true
   * is followed by one `joined`. */
  join(host: string): boolean {
    const known = this.hosts.has(host) || this.joining.has(host);
    let places = this.hosts.size;
    for (const each of this.joining.keys()) if (!this.hosts.has(each)) places += 1;
    if (!known && places >= MAX_HOSTS) return false;
    this.joining.set(host, (this.joining.get(host) ?? 0) + 1);
    return true;
  }

  /** The end of `host`'s `Init`: attached when it succeeded. */
  joined(host: string, succeeded: boolean): void {
    const running = (this.joining.get(host) ?? 1) - 1;
    if (running > 0) this.joining.set(host, running);
    else this.joining.delete(host);
    if (succeeded) this.hosts.add(host);
  }

  /** Take `leaving` out; whether another host is still attached (then its `Stop` or
   * `Destroy` runs nothing). */
  othersStay(leaving: string): boolean {
    this.hosts.delete(leaving);
    return this.hosts.size > 0;
  }

  get size(): number {
    return this.hosts.size;
  }
}
