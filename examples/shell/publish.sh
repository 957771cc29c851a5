#!/usr/bin/env bash
# Publish one busd artifact event with the `nats` CLI (natscli).
#
#   NATS_URL=nats://127.0.0.1:4222 examples/shell/publish.sh \
#       --run-id sim-42 --kind simulation [--producer lab.shell] [--status succeeded] \
#       [--event-id ID] [--rows fills=1042] fills=runs/sim-42/fills.parquet ...
#
# Each NAME=PATH names one Parquet file the job wrote. Its size (`stat -c %s`) and SHA-256
# (`sha256sum`) go into the event; busd checks both. `--rows NAME=N` adds the row count
# (optional: this script does not read Parquet footers, busd does).
#
# Paths: an absolute path is sent as it is. A relative path is read from $ARTIFACT_ROOT when
# that is set, and sent relative (busd resolves it against its first artifact root, which
# should be the same directory); without $ARTIFACT_ROOT it is made absolute from the current
# directory. Either way busd requires the file to lie inside one of its artifact roots.
#
# The event goes to subject artifacts.<producer> with header Nats-Msg-Id: <event_id>, and
# `nats pub -J` waits for the JetStream PubAck, so exit 0 means the event is stored (JetStream
# drops a re-publish of the same event id inside the stream's duplicate window).
#
# --print writes the event JSON to stdout instead of publishing it (check it offline with
# `busd validate FILE`).
#
# Exit codes: 0 stored (the event id is printed), 1 publish failed, 2 bad usage.
set -euo pipefail

PROG=${0##*/}
IDENT_RE='^[A-Za-z0-9._:/-]{1,200}$'
# A producer is the rest of the subject: dot-separated non-empty tokens.
PRODUCER_RE='^[A-Za-z0-9_:/-]+(\.[A-Za-z0-9_:/-]+)*$'

usage() {
    cat >&2 <<EOF
usage: $PROG --run-id ID --kind KIND [--producer NAME] [--status STATUS] [--event-id ID]
       [--rows NAME=N ...] [--server URL] [--print] NAME=PATH [NAME=PATH ...]
environment: NATS_URL (default nats://127.0.0.1:4222), ARTIFACT_ROOT (optional)
EOF
    exit 2
}

die() {
    printf '%s: %s\n' "$PROG" "$1" >&2
    exit "${2:-2}"
}

# json_str TEXT: TEXT as a JSON string literal (quotes included). Callers have already
# refused control characters (need_text), so only backslash and quote need escaping.
json_str() {
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}

need_text() {  # need_text WHAT VALUE: no control characters (they would need \u escapes)
    [[ $2 != *[[:cntrl:]]* ]] || die "$1 ${2@Q}: contains a control character"
}

need_ident() {  # need_ident WHAT VALUE
    [[ $2 =~ $IDENT_RE ]] || die "$1 ${2@Q}: 1-200 characters of A-Z a-z 0-9 . _ : / -"
}

run_id='' kind='' status=succeeded event_id='' print_only=0
producer=${PRODUCER:-examples.shell}
server=${NATS_URL:-nats://127.0.0.1:4222}
declare -A rows=()
specs=()

while (($#)); do
    case $1 in
        --run-id) run_id=${2-}; shift 2 || usage ;;
        --kind) kind=${2-}; shift 2 || usage ;;
        --producer) producer=${2-}; shift 2 || usage ;;
        --status) status=${2-}; shift 2 || usage ;;
        --event-id) event_id=${2-}; shift 2 || usage ;;
        --server) server=${2-}; shift 2 || usage ;;
        --print) print_only=1; shift ;;
        --rows)
            [[ ${2-} =~ ^([^=]+)=([0-9]+)$ ]] || die "--rows ${2-}: expected NAME=N"
            rows[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
            shift 2 ;;
        -h | --help) usage ;;
        --) shift; specs+=("$@"); break ;;
        -*) die "unknown option $1" ;;
        *) specs+=("$1"); shift ;;
    esac
done

[[ -n $run_id && -n $kind ]] || usage
((${#specs[@]})) || die "no artifacts: give at least one NAME=PATH"
((${#specs[@]} <= 1000)) || die "at most 1000 artifacts per event"
need_ident run_id "$run_id"
need_ident kind "$kind"
[[ $producer =~ $PRODUCER_RE && ${#producer} -le 200 ]] \
    || die "producer ${producer@Q}: dot-separated tokens of A-Z a-z 0-9 _ : / -"
need_text status "$status"
((${#status} <= 200)) || die "status: at most 200 characters"

declare -A seen=()
items=()
fingerprint=''
for spec in "${specs[@]}"; do
    [[ $spec == *=* ]] || die "argument ${spec@Q}: expected NAME=PATH"
    name=${spec%%=*}
    path=${spec#*=}
    need_ident "artifact name" "$name"
    [[ -n $path ]] || die "artifact $name: empty path"
    need_text "artifact $name: path" "$path"
    [[ -z ${seen[$name]+x} ]] || die "artifact $name: named twice"
    seen[$name]=1

    if [[ $path == /* ]]; then
        file=$path
    elif [[ -n ${ARTIFACT_ROOT:-} ]]; then
        file=$ARTIFACT_ROOT/$path
    else
        file=$PWD/$path
        path=$file
    fi
    [[ -f $file ]] || die "artifact $name: no such file: $file"

    size=$(stat -c %s -- "$file")
    sha=$(sha256sum <"$file")  # from stdin: with a file name, odd names get a "\" prefix
    sha=${sha%% *}
    [[ $sha =~ ^[0-9a-f]{64}$ ]] || die "artifact $name: cannot hash $file" 1
    fingerprint+="$name=$sha;"

    item="{\"name\":$(json_str "$name"),\"path\":$(json_str "$path"),\"bytes\":$size,\"sha256\":\"$sha\""
    if [[ -n ${rows[$name]+x} ]]; then
        item+=",\"rows\":${rows[$name]}"
        unset 'rows[$name]'
    fi
    items+=("$item}")
done
((${#rows[@]} == 0)) || die "--rows for unknown artifact(s): ${!rows[*]}"

if [[ -z $event_id ]]; then
    # Stable for the same files, so a retry of this script is a duplicate, not a new event.
    digest=$(printf '%s' "$fingerprint" | sha256sum)
    event_id="$run_id:${digest:0:16}"
fi
need_ident event_id "$event_id"

artifacts=$(IFS=,; printf '%s' "${items[*]}")
json="{\"schema_version\":1,\"event_id\":$(json_str "$event_id"),\"producer\":$(json_str "$producer"),\
\"run\":{\"run_id\":$(json_str "$run_id"),\"kind\":$(json_str "$kind"),\"status\":$(json_str "$status"),\
\"finished_at\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"},\"artifacts\":[$artifacts]}"

if ((print_only)); then  # for `busd validate FILE` in a producer's own tests
    printf '%s\n' "$json"
    exit 0
fi

# `nats pub` expands Go templates ({{ ... }}) in the body; JSON has no "{{" outside strings,
# so refuse the rare path that would be rewritten rather than publish something else.
[[ $json != *'{{'* ]] || die "an artifact path contains '{{', which nats pub would expand"
# One argument is capped by the kernel at 128 KiB: far above a few hundred artifacts.
((${#json} <= 131000)) || die "event too large for one command-line argument"

command -v nats >/dev/null || die "the nats CLI (natscli) is not on PATH" 1
if ! nats pub -J -H "Nats-Msg-Id:$event_id" --server "$server" "artifacts.$producer" "$json"; then
    die "publish to artifacts.$producer failed" 1
fi
printf '%s\n' "$event_id"
