"""Kueue's CRDs and webhooks as its release installs them, for e2e/cluster: the API
versions it serves convert through its webhook, here at a loopback URL.

Usage: kueue_manifests.py URL CA_BUNDLE CRDS_JSON KUSTOMIZATION WEBHOOKS_JSON
(the JSON files as `kubectl create --dry-run=client -o json` prints them); writes one
List to standard output.
"""
import json, re, sys
url, ca, crds, kustomization, webhooks = sys.argv[1:]
def items(path):
    # kubectl prints one object per file, a List for several in one file.
    text, at, out = open(path).read(), 0, []
    while text[at:].strip():
        obj, at = json.JSONDecoder().raw_decode(text, len(text) - len(text[at:].lstrip()))
        out += obj["items"] if obj["kind"] == "List" else [obj]
    return out
client = lambda path: {"url": url + path, "caBundle": ca}
# The kinds whose versions convert: those the release's kustomization patches in.
converted = {name + ".kueue.x-k8s.io"
             for name in re.findall(r"^- path: patches/webhook_in_(\w+)\.yaml", open(kustomization).read(), re.M)}
docs = []
for crd in items(crds):
    if crd["metadata"]["name"] in converted:
        crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
            "clientConfig": client("/convert"), "conversionReviewVersions": ["v1"]}}
    docs.append(crd)
# Only Kueue's own kinds: the job integrations' webhooks would intercept every Job and Pod.
for hooks in items(webhooks):
    hooks["metadata"]["name"] = "kueue-" + hooks["metadata"]["name"]
    hooks["webhooks"] = [h for h in hooks["webhooks"]
                         if all(g == "kueue.x-k8s.io" for r in h["rules"] for g in r["apiGroups"])]
    for h in hooks["webhooks"]:
        h["clientConfig"] = client(h["clientConfig"]["service"]["path"])
    docs.append(hooks)
json.dump({"apiVersion": "v1", "kind": "List", "items": docs}, sys.stdout)
