#!/usr/bin/env python3
"""The module graph of one crate, from its `crate::` paths (comments and #[cfg(test)] code
left out), and its import cycles. Usage: scripts/module-graph.py replicator/src"""
import os, re, sys
src = sys.argv[1]
mods = {}
for root, _, files in os.walk(src):
    for f in files:
        if not f.endswith('.rs') or 'bin' in root.split(os.sep): continue
        p = os.path.join(root, f)
        rel = os.path.relpath(p, src)[:-3]
        name = rel.split(os.sep)[0]
        if name in ('main', 'lib'): continue
        mods.setdefault(name, set())
        text = open(p).read()
        text = re.split(r'#\[cfg\(test\)\]', text)[0]
        text = re.sub(r'//[^\n]*', '', text)  # comments and doc links are not dependencies
        for m in re.finditer(r'crate::(\{[^}]*\}|\w+)', text):
            g = m.group(1)
            names = re.findall(r'(\w+)', g) if g.startswith('{') else [g]
            for n in names:
                if n != name: mods[name].add(n)
        for m in re.finditer(r'^\s*use\s+(?:self|super)::(\w+)', text, re.M): pass
known = set(mods)
edges = {a: sorted(b & known) for a, b in mods.items()}
for a in sorted(edges): print(f"{a} -> {', '.join(edges[a]) or '-'}")
# strongly connected components (Tarjan)
idx, low, st, on, out, c = {}, {}, [], set(), [], [0]
def sc(v):
    idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
    for w in edges[v]:
        if w not in idx: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        comp = []
        while True:
            w = st.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: out.append(sorted(comp))
sys.setrecursionlimit(10000)
for v in sorted(edges):
    if v not in idx: sc(v)
print("cycles (strongly connected groups):", out or "none")
