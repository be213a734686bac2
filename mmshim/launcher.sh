#!/bin/sh
# The `mmshim` runtime executable: the fast path in front of the Python runtime.
#
# Generated from mmshim/launcher.sh by install/write-entrypoints.py. containerd calls the runtime
# about four times per container; a shell starts in 0.5 ms, Python in 8. So this script only
# answers "is there anything for mmshim to do?" and, when the answer is plainly no (a subcommand
# mmshim does not intercept, a container that is not a Batch job, a start or delete of one that
# mmshim did not restore), execs runc itself. Anything else, and anything unusual (flags it does
# not know, no runc found, an unreadable config.json), goes to the Python runtime, which decides
# again in full and reports errors the way runc does.

slow() { MMSHIM_SELF=$0 exec '@RUNTIME@' "$@"; }

runc=${MMSHIM_RUNC-}
if [ -n "$runc" ]; then
    { [ -x "$runc" ] && [ ! -d "$runc" ] && ! [ "$runc" -ef "$0" ]; } || slow "$@"  # Python says why
else
    [ -e '@CONFIG@' ] && slow "$@"  # runc named in the config file: Python reads TOML
    IFS=:
    for d in ${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}; do
        c=${d:-.}/runc
        if [ -x "$c" ] && [ ! -d "$c" ] && ! [ "$c" -ef "$0" ]; then runc=$c; break; fi
    done
    unset IFS
    [ -n "$runc" ] || slow "$@"
fi

cmd= id= want= bundle=. root=/run/runc
for a do
    if [ -n "$want" ]; then
        case $want in root) root=$a ;; bundle) bundle=$a ;; esac
        want=
        continue
    fi
    if [ -z "$cmd" ]; then
        case $a in
            --root | -root) want=root ;;
            --root=* | -root=*) root=${a#*=} ;;
            --log | -log | --log-format | -log-format | --criu | -criu | --rootless | -rootless) want=value ;;
            --log=* | -log=* | --log-format=* | -log-format=* | --criu=* | -criu=* | --rootless=* | -rootless=*) ;;
            --debug | -debug | --debug=* | -debug=* | --systemd-cgroup | -systemd-cgroup) ;;
            --systemd-cgroup=* | -systemd-cgroup=*) ;;
            -*) slow "$@" ;;
            create | start | delete) cmd=$a ;;
            *) exec "$runc" "$@" ;;
        esac
        continue
    fi
    case $a in
        --bundle | -bundle | -b | --b) want=bundle ;;
        --bundle=* | -bundle=* | -b=* | --b=*) bundle=${a#*=} ;;
        --console-socket | -console-socket | --pid-file | -pid-file | --preserve-fds | -preserve-fds) want=value ;;
        --console-socket=* | -console-socket=* | --pid-file=* | -pid-file=* | --preserve-fds=* | -preserve-fds=*) ;;
        --no-pivot | -no-pivot | --no-new-keyring | -no-new-keyring | --force | -force | -f | --f) ;;
        -*) slow "$@" ;;
        *) [ -n "$id" ] && slow "$@"; id=$a ;;
    esac
done
{ [ -n "$want" ] || [ -z "$id" ]; } && slow "$@"

case $cmd in
    create)
        [ -r "$bundle/config.json" ] || slow "$@"
        grep -q -e AWS_BATCH_JOB_ID= -e MMSHIM_JOB_ID= "$bundle/config.json" && slow "$@"
        ;;
    start) [ -e "$root/$id/mmshim.restored" ] && slow "$@" ;;
esac
exec "$runc" "$@"
