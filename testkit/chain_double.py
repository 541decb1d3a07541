#!/usr/bin/env python3
"""A chain double for the tests: the one part of Sundara's world that cannot run here (no
package registry ships a subtensor node). It speaks the chain bridge's protocol
(services/cli/src/bridge.rs) - `chain_double.py --state FILE --hotkey SS58 <op>`, a JSON
request on stdin, a JSON answer on stdout - and enforces the weight-setting rules a subnet
does: a validator permit, `version_key` at least the subnet's, commit-reveal on or off
(plain weights on a commit-reveal subnet fail, and the reverse), and one setting per
`weights_rate_limit` blocks. Blocks advance with wall time (`block_seconds` each).

What it does not prove: the SDK's extrinsics, drand timelock encryption and the chain's
reveal, stake-weighted consensus, or anything about a live network's latency and faults
beyond the `fail_next` transient failures a test asks for. Every weight setting it
receives is recorded in the state file (`received`) for the test to check.
"""
import argparse
import fcntl
import json
import sys
import time


def block_now(state):
    return state["start_block"] + int((time.time() - state["started_at"]) / state["block_seconds"])


def rules(state, _request, _hotkey):
    return {
        "block": block_now(state),
        "commit_reveal": state["commit_reveal"],
        "weights_rate_limit": state["weights_rate_limit"],
        "weights_version": state["weights_version"],
    }


def metagraph(state, _request, _hotkey):
    m = dict(state["metagraph"])
    m["block"] = block_now(state)
    return m


def set_weights(state, request, hotkey):
    if state.get("fail_next", 0) > 0:
        state["fail_next"] -= 1
        raise ConnectionError("the chain endpoint closed the connection")
    block = block_now(state)
    if request["netuid"] != state["netuid"]:
        raise ValueError(f"no subnet {request['netuid']}")
    if len(request["uids"]) != len(request["weights"]):
        raise ValueError("uids and weights differ in length")
    if hotkey not in state["permits"]:
        return {"kind": "no_permit"}
    if request["version_key"] < state["weights_version"]:
        return {"kind": "version_key_too_low", "required": state["weights_version"]}
    wants_commit = request["mode"] == "commit_reveal"
    if wants_commit != state["commit_reveal"]:
        return {"kind": "commit_reveal_mismatch", "commit_reveal": state["commit_reveal"]}
    last = state.setdefault("last_set", {}).get(hotkey)
    if last is not None and block - last < state["weights_rate_limit"]:
        return {"kind": "rate_limited", "retry_after_blocks": last + state["weights_rate_limit"] - block}
    state["last_set"][hotkey] = block
    state.setdefault("received", []).append(
        {"block": block, "hotkey": hotkey, "mode": request["mode"], "uids": request["uids"],
         "weights": request["weights"], "version_key": request["version_key"]})
    return {"kind": "included", "block": block}


OPS = {"rules": rules, "metagraph": metagraph, "set-weights": set_weights}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True)
    parser.add_argument("--hotkey", required=True, help="the validator hotkey (SS58) this bridge signs with")
    parser.add_argument("op", choices=sorted(OPS))
    args = parser.parse_args()
    request = json.load(sys.stdin)
    with open(args.state, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        state = json.load(f)
        try:
            answer = OPS[args.op](state, request, args.hotkey)
        except (ConnectionError, ValueError) as e:
            answer = None
            error = e
        f.seek(0)
        json.dump(state, f)
        f.truncate()
    if answer is None:
        print(f"chain double: {error}", file=sys.stderr)
        sys.exit(1)
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
