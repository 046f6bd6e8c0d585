"""``net.report()``: what conversion found, for people (``render``) and programs (``summary``)."""

from __future__ import annotations


def summary(net) -> dict:
    space = net.space
    full, small = space.full(), space.smallest()
    full_macs = space.macs(full)
    return {
        "model": type(net.model).__name__,
        "input_size": list(space.input_size),
        "groups": [{"name": g.name, "channels": g.size, "unit": g.unit, "choices": list(space.choices(g.name)),
                    "members": [f"{m.module}:{m.dim}" for m in g.members]}
                   for g in net.channel_groups if g.frozen is None],
        "frozen_groups": [{"name": g.name, "channels": g.size, "why": g.frozen} for g in net.channel_groups
                          if g.frozen is not None],
        "stages": [{"container": st.container, "blocks": st.blocks} for st in net.depth_stages],
        "rejected_blocks": dict(net.notes.rejected_blocks),
        "depth_error": net.notes.depth_error,
        "batched": net.batched,
        "batched_fallback_reason": net.notes.batched,
        "importance_sort": net.notes.sorted_by,
        "macs_full": full_macs,
        "macs_smallest": space.macs(small),
        "params_full": space.params(full),
        "params_smallest": space.params(small),
    }  # fmt: skip


def render(net) -> str:
    s = summary(net)
    lines = [f"stp_fast supernet of {s['model']} (input {tuple(s['input_size'])})",
             f"  MACs: full {s['macs_full'] / 1e6:.2f}M, smallest arch {s['macs_smallest'] / 1e6:.2f}M "
             f"({s['macs_smallest'] / max(s['macs_full'], 1):.1%}); params {s['params_full'] / 1e3:.1f}k -> "
             f"{s['params_smallest'] / 1e3:.1f}k",
             f"  elastic channel groups: {len(s['groups'])}"]  # fmt: skip
    for g in s["groups"]:
        unit = f", in units of {g['unit']}" if g["unit"] > 1 else ""
        lines.append(f"    {g['name']}: {g['channels']} channels{unit} ({len(g['members'])} layer dims)")
    lines.append(f"  frozen groups (kept at full width): {len(s['frozen_groups'])}")
    for g in s["frozen_groups"]:
        lines.append(f"    {g['name']} ({g['channels']}): {g['why']}")
    lines.append(f"  depth: {len(s['stages'])} stage(s)")
    for st in s["stages"]:
        lines.append(f"    {st['container']}: {', '.join(st['blocks'])} (first kept, the rest skippable)")
    if s["depth_error"]:
        lines.append(f"    no depth: {s['depth_error']}")
    lines.append("  forward_many: " + ("one pass for all archs" if s["batched"] else
                                        f"one pass per arch ({s['batched_fallback_reason']})"))
    if s["importance_sort"]:
        lines.append(f"  channels sorted by importance ({s['importance_sort']})")
    return "\n".join(lines)
