#!/usr/bin/env python3
"""Sundara's chain bridge on the official Bittensor SDK (`pip install bittensor`, v10/11).

`sundara chain serve --bridge "python3 scripts/bittensor_bridge.py --network finney
--wallet-name validator --wallet-hotkey default"` runs it once per request: the op as the
last argument, a JSON request on stdin, one JSON answer on stdout (services/cli/src/bridge.rs):

  rules        {netuid} -> {block, commit_reveal, weights_rate_limit, weights_version}
  metagraph    {netuid} -> {netuid, block, neurons: [{uid, hotkey, coldkey, stake,
                             validator_permit, registered_at_block}]}
  set-weights  {netuid, uids, weights, version_key, mode} -> one outcome, by kind:
               included {block} | rate_limited {retry_after_blocks} |
               commit_reveal_mismatch {commit_reveal} | version_key_too_low {required} |
               no_permit | unavailable {message}

The SDK's `set_weights` takes the subnet's path itself: a drand-timelocked commit that the
chain reveals when commit-reveal is on, plain weights otherwise. The chain's errors are
mapped to the outcome kinds by their names (the chain's own typed errors). The wallet's
hotkey signs; mount the wallet read-only. Exit status 1 with a message on stderr when the
chain cannot be reached: the validator retries with backoff.

Not exercised in CI (no subtensor node can run there): tests/chain.rs runs the same
protocol against testkit/chain_double.py. Check a deployment with
`sundara chain weights --dry-run` and `sundara chain status` before trusting it.
"""
import argparse
import json
import sys

ERRORS = [
    ("CommitRevealEnabled", lambda hp: {"kind": "commit_reveal_mismatch", "commit_reveal": True}),
    ("CommitRevealDisabled", lambda hp: {"kind": "commit_reveal_mismatch", "commit_reveal": False}),
    ("IncorrectWeightVersionKey", lambda hp: {"kind": "version_key_too_low", "required": int(hp.weights_version)}),
    ("SettingWeightsTooFast", lambda hp: {"kind": "rate_limited", "retry_after_blocks": int(hp.weights_rate_limit)}),
    ("NeuronNoValidatorPermit", lambda hp: {"kind": "no_permit"}),
    ("NotEnoughStakeToSetWeights", lambda hp: {"kind": "no_permit"}),
    ("HotKeyNotRegisteredInSubNet", lambda hp: {"kind": "no_permit"}),
]


def connect(args):
    try:
        import bittensor as bt
    except ImportError:
        sys.exit("the bridge needs the Bittensor SDK: pip install bittensor")
    return bt, bt.Subtensor(network=args.network)


def rules(args, request):
    _, subtensor = connect(args)
    hp = subtensor.get_subnet_hyperparameters(request["netuid"])
    return {
        "block": int(subtensor.get_current_block()),
        "commit_reveal": bool(hp.commit_reveal_weights_enabled),
        "weights_rate_limit": int(hp.weights_rate_limit),
        "weights_version": int(hp.weights_version),
    }


def metagraph(args, request):
    _, subtensor = connect(args)
    m = subtensor.metagraph(request["netuid"])
    neurons = [
        {
            "uid": int(m.uids[i]),
            "hotkey": m.hotkeys[i],
            "coldkey": m.coldkeys[i],
            "stake": float(m.S[i]),
            "validator_permit": bool(m.validator_permit[i]),
            "registered_at_block": int(m.block_at_registration[i]),
        }
        for i in range(len(m.uids))
    ]
    return {"netuid": request["netuid"], "block": int(m.block), "neurons": neurons}


def set_weights(args, request):
    bt, subtensor = connect(args)
    wallet = bt.Wallet(name=args.wallet_name, hotkey=args.wallet_hotkey, path=args.wallet_path)
    hp = subtensor.get_subnet_hyperparameters(request["netuid"])
    if bool(hp.commit_reveal_weights_enabled) != (request["mode"] == "commit_reveal"):
        return {"kind": "commit_reveal_mismatch", "commit_reveal": bool(hp.commit_reveal_weights_enabled)}
    response = subtensor.set_weights(
        wallet=wallet,
        netuid=request["netuid"],
        uids=request["uids"],
        weights=request["weights"],
        version_key=request["version_key"],
        wait_for_inclusion=True,
        wait_for_finalization=False,
    )
    # v10+ answers an ExtrinsicResponse; older SDKs a (success, message) pair.
    success, message = (response.success, response.message) if hasattr(response, "success") else response
    if success:
        return {"kind": "included", "block": int(subtensor.get_current_block())}
    for name, outcome in ERRORS:
        if name in str(message):
            return outcome(hp)
    return {"kind": "unavailable", "message": str(message)[:500]}


OPS = {"rules": rules, "metagraph": metagraph, "set-weights": set_weights}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", default="finney", help="finney, test, local, or a ws(s):// endpoint")
    parser.add_argument("--wallet-name", default="default")
    parser.add_argument("--wallet-hotkey", default="default")
    parser.add_argument("--wallet-path", default="~/.bittensor/wallets")
    parser.add_argument("op", choices=sorted(OPS))
    args = parser.parse_args()
    request = json.load(sys.stdin)
    try:
        answer = OPS[args.op](args, request)
    except (ConnectionError, TimeoutError, OSError) as e:
        sys.exit(f"the chain is unreachable: {e}")
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
