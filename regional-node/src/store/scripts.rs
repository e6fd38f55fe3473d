//! The store's Lua scripts and the typed requests they take.
//!
//! A script's KEYS and ARGV are positional (Redis' only calling convention, and the
//! cheapest: decoding JSON in Lua cost about 1.8x the Redis instructions of a
//! commit). What keeps the two sides in step is a [`Layout`] per script, a constant
//! that names every position: fixed keys, header arguments (the counts among them),
//! and repeated items with their key and their fields. Both sides are derived from
//! it:
//! - Rust encodes a request through an [`Encoder`] that places each value by its
//!   name and writes the counts itself ([`CommitRequest::encode`] and the others);
//! - each script starts with a prelude generated from the same layout ([`prelude`]):
//!   named locals for the fixed keys and arguments, the counts, the base offset of
//!   each item list and its fields' offsets as constants, and a check that KEYS and
//!   ARGV have exactly the lengths the counts imply.
//!
//! A request that does not fit (a wrong count, an unknown mode) is refused before
//! anything is written, with an error reply that starts with [`BAD_REQUEST`]; the
//! store maps it to `StoreError::BadRequest`.

use eventlog::envelope::{FIELD_EVENT, FIELD_TYPE};
use eventlog::keys;
use redis::Script;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::LazyLock;

/// The code of the error reply a script answers a malformed request with.
pub const BAD_REQUEST: &str = "TANDEM_BAD_REQUEST";

/// Where each value of a script's KEYS and ARGV sits, by name.
///
/// KEYS: `keys`, then each list's item keys (lists with `keyed`), list after list.
/// ARGV: `args`, then each list's items' `fields`, list after list. A header argument
/// named `n_<list>` is that list's item count, written by the [`Encoder`].
#[derive(Debug)]
pub struct Layout {
    /// The script's name, in error messages.
    pub script: &'static str,
    pub keys: &'static [&'static str],
    pub args: &'static [&'static str],
    pub lists: &'static [List],
    /// String constants both sides use (modes, flags, stream field names), defined in
    /// the prelude as Lua locals.
    pub consts: &'static [(&'static str, &'static str)],
}

/// Items repeated `n_<name>` times: one key each if `keyed`, and `fields` (the stride).
#[derive(Debug)]
pub struct List {
    pub name: &'static str,
    pub keyed: bool,
    pub fields: &'static [&'static str],
}

impl Layout {
    fn count_arg(&self, list: &List) -> usize {
        let name = format!("n_{}", list.name);
        self.args
            .iter()
            .position(|a| *a == name)
            .unwrap_or_else(|| panic!("{}: no count argument {name}", self.script))
    }

    fn list_index(&self, name: &str) -> usize {
        self.lists
            .iter()
            .position(|l| l.name == name)
            .unwrap_or_else(|| panic!("{}: no list {name}", self.script))
    }
}

// How a guarded key is compared, and whether it is written.
const EXPECT_NOTHING: &str = "n";
const EXPECT_ABSENT: &str = "a";
const EXPECT_VALUE: &str = "v";
const WRITE_NO: &str = "0";
const WRITE_YES: &str = "1";

/// The atomic commit of a decision (see [`CommitRequest`]).
pub const COMMIT_LAYOUT: Layout = Layout {
    script: "commit",
    keys: &["role", "events", "event_index", "cursor"],
    args: &[
        "epoch",
        "n_guarded",
        "n_events",
        "n_counters",
        "ack_group",
        "ack_id",
    ],
    lists: &[
        List {
            name: "guarded",
            keyed: true,
            fields: &["mode", "expected", "write", "value"],
        },
        List {
            name: "events",
            keyed: true,
            fields: &["event_id", "type", "json"],
        },
        List {
            name: "counters",
            keyed: true,
            fields: &["field", "delta"],
        },
    ],
    consts: &[
        ("EXPECT_NOTHING", EXPECT_NOTHING),
        ("EXPECT_ABSENT", EXPECT_ABSENT),
        ("EXPECT_VALUE", EXPECT_VALUE),
        ("WRITE_NO", WRITE_NO),
        ("WRITE_YES", WRITE_YES),
        ("FIELD_TYPE", FIELD_TYPE),
        ("FIELD_EVENT", FIELD_EVENT),
    ],
};

/// A consumed entry moved to the dead letters (see [`ParkRequest`]).
pub const PARK_LAYOUT: Layout = Layout {
    script: "park",
    keys: &["role", "dlq", "events"],
    args: &["epoch", "group", "entry_id", "n_fields"],
    lists: &[List {
        name: "fields",
        keyed: false,
        fields: &["name", "value"],
    }],
    consts: &[],
};

/// The projector's step (see [`ApplyRequest`]).
pub const APPLY_LAYOUT: Layout = Layout {
    script: "apply",
    keys: &["cursor", "event_index"],
    args: &["expected_cursor", "n_entries", "n_writes", "n_counters"],
    lists: &[
        List {
            name: "entries",
            keyed: true,
            fields: &["entry_id", "event_id"],
        },
        List {
            name: "writes",
            keyed: true,
            fields: &["value"],
        },
        List {
            name: "counters",
            keyed: true,
            fields: &["field", "delta"],
        },
    ],
    consts: &[],
};

/// The Lua that names the positions of `layout` and refuses a request that does not
/// fit it. Defines, for a layout like [`COMMIT_LAYOUT`]:
/// - `key_<name>` = KEYS[i] for each fixed key, `<name>` = ARGV[i] for each header
///   argument, and `n_<list>` as a number (refused unless a count);
/// - per list: `<list>_key` (the KEYS index of its first item's key, if keyed),
///   `<list>_arg` (the ARGV index of its first item's first field), `<LIST>_STRIDE`
///   and `<LIST>_<FIELD>`, each field's offset inside an item;
/// - the layout's string constants.
pub fn prelude(layout: &Layout) -> String {
    let script = layout.script;
    let mut lua =
        format!("-- Generated from the Rust layout of the '{script}' script (store/scripts.rs).\n");
    writeln!(lua, "local BAD_REQUEST = '{BAD_REQUEST} {script}: '").unwrap();
    for (name, value) in layout.consts {
        writeln!(lua, "local {name} = '{value}'").unwrap();
    }
    for (i, name) in layout.keys.iter().enumerate() {
        writeln!(lua, "local key_{name} = KEYS[{}]", i + 1).unwrap();
    }
    let counts: Vec<usize> = layout.lists.iter().map(|l| layout.count_arg(l)).collect();
    for (i, name) in layout.args.iter().enumerate() {
        let n = i + 1;
        if counts.contains(&i) {
            writeln!(
                lua,
                "local {name} = tonumber(ARGV[{n}])\n\
                 if not {name} or {name} < 0 or {name} % 1 ~= 0 then\n  \
                 return redis.error_reply(BAD_REQUEST .. '{name} (ARGV[{n}]) is not a count: ' .. tostring(ARGV[{n}]))\n\
                 end"
            )
            .unwrap();
        } else {
            writeln!(lua, "local {name} = ARGV[{n}]").unwrap();
        }
    }
    // Running positions: a literal for the first list, then each list's base plus
    // the previous list's items.
    let mut key_at = (layout.keys.len() + 1).to_string();
    let mut arg_at = (layout.args.len() + 1).to_string();
    for list in layout.lists {
        let name = list.name;
        let upper = name.to_uppercase();
        let offsets: Vec<String> = (0..list.fields.len()).map(|o| o.to_string()).collect();
        let fields: Vec<String> = list
            .fields
            .iter()
            .map(|f| format!("{upper}_{}", f.to_uppercase()))
            .collect();
        writeln!(lua, "local {upper}_STRIDE = {}", list.fields.len()).unwrap();
        writeln!(lua, "local {} = {}", fields.join(", "), offsets.join(", ")).unwrap();
        writeln!(lua, "local {name}_arg = {arg_at}").unwrap();
        arg_at = format!("{name}_arg + n_{name} * {upper}_STRIDE");
        if list.keyed {
            writeln!(lua, "local {name}_key = {key_at}").unwrap();
            key_at = format!("{name}_key + n_{name}");
        }
    }
    writeln!(
        lua,
        "if #KEYS ~= {key_at} - 1 or #ARGV ~= {arg_at} - 1 then\n  \
         return redis.error_reply(BAD_REQUEST .. string.format('%d KEYS and %d ARGV where the counts say %d and %d', #KEYS, #ARGV, {key_at} - 1, {arg_at} - 1))\n\
         end"
    )
    .unwrap();
    lua
}

/// A script's arguments, in order, ready to send (see `Store::eval`).
#[derive(Debug, Clone)]
pub struct Encoded<'a> {
    pub layout: &'static Layout,
    pub keys: Vec<Cow<'a, str>>,
    pub args: Vec<Cow<'a, str>>,
}

impl Encoded<'_> {
    /// The script these arguments are for.
    pub fn script(&self) -> &'static Script {
        match self.layout.script {
            "commit" => &COMMIT,
            "park" => &PARK,
            "apply" => &APPLY,
            other => unreachable!("no script {other}"),
        }
    }
}

/// Places values by their names in a [`Layout`]; counts are written from the items.
/// A name that is not in the layout, a missing value, or an item with the wrong
/// number of fields is a bug in this module, caught by its unit tests.
pub struct Encoder<'a> {
    layout: &'static Layout,
    keys: Vec<Option<Cow<'a, str>>>,
    args: Vec<Option<Cow<'a, str>>>,
    /// Per list, in the layout's order.
    items: Vec<Items<'a>>,
}

/// The items added to one list so far.
#[derive(Clone, Default)]
struct Items<'a> {
    keys: Vec<Cow<'a, str>>,
    fields: Vec<Cow<'a, str>>,
    count: usize,
}

impl<'a> Encoder<'a> {
    pub fn new(layout: &'static Layout) -> Encoder<'a> {
        Encoder {
            layout,
            keys: vec![None; layout.keys.len()],
            args: vec![None; layout.args.len()],
            items: vec![Default::default(); layout.lists.len()],
        }
    }

    pub fn key(&mut self, name: &str, value: impl Into<Cow<'a, str>>) -> &mut Self {
        let i = position(self.layout.keys, name, self.layout.script);
        self.keys[i] = Some(value.into());
        self
    }

    pub fn arg(&mut self, name: &str, value: impl Into<Cow<'a, str>>) -> &mut Self {
        let i = position(self.layout.args, name, self.layout.script);
        self.args[i] = Some(value.into());
        self
    }

    /// Adds an item to `list`: its key (for a keyed list) and its fields, in the
    /// list's field order.
    pub fn item<const N: usize>(
        &mut self,
        list: &str,
        key: Option<Cow<'a, str>>,
        fields: [Cow<'a, str>; N],
    ) -> &mut Self {
        let l = self.layout.list_index(list);
        let spec = &self.layout.lists[l];
        assert_eq!(
            N,
            spec.fields.len(),
            "{}: fields of {list}",
            self.layout.script
        );
        assert_eq!(
            key.is_some(),
            spec.keyed,
            "{}: key of {list}",
            self.layout.script
        );
        let items = &mut self.items[l];
        items.keys.extend(key);
        items.fields.extend(fields);
        items.count += 1;
        self
    }

    pub fn finish(mut self) -> Encoded<'a> {
        let layout = self.layout;
        for (l, list) in layout.lists.iter().enumerate() {
            let at = layout.count_arg(list);
            self.args[at] = Some(self.items[l].count.to_string().into());
        }
        let missing = |names: &[&str], values: &[Option<Cow<'_, str>>]| {
            names
                .iter()
                .zip(values)
                .find(|(_, v)| v.is_none())
                .map(|(n, _)| n.to_string())
        };
        if let Some(name) = missing(layout.keys, &self.keys).or(missing(layout.args, &self.args)) {
            panic!("{}: no value for {name}", layout.script);
        }
        let mut keys: Vec<Cow<'a, str>> = self.keys.into_iter().flatten().collect();
        let mut args: Vec<Cow<'a, str>> = self.args.into_iter().flatten().collect();
        for items in self.items {
            keys.extend(items.keys);
            args.extend(items.fields);
        }
        Encoded { layout, keys, args }
    }
}

fn position(names: &[&str], name: &str, script: &str) -> usize {
    names
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("{script}: no position named {name}"))
}

/// What the commit compares a guarded key against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expect<'a> {
    /// Not read by the decision: only written.
    Nothing,
    /// Read as absent: it must still be.
    Absent,
    /// Read with this value: it must still hold it.
    Value(&'a str),
}

/// A key the decision read or writes.
#[derive(Debug, Clone)]
pub struct Guarded<'a> {
    pub key: &'a str,
    pub expect: Expect<'a>,
    /// The value to set once every guard holds.
    pub write: Option<&'a str>,
}

/// An event to append to `tandem:events`, indexed by its event id and its aggregate.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub event_id: &'a str,
    pub aggregate_id: &'a str,
    pub event_type: Cow<'a, str>,
    /// The envelope, serialised (the entry's `event` field).
    pub json: Cow<'a, str>,
}

/// `HINCRBY key field delta`.
#[derive(Debug, Clone)]
pub struct Counter<'a> {
    pub key: &'a str,
    pub field: &'a str,
    pub delta: i64,
}

/// The consumed stream entry a commit acknowledges.
#[derive(Debug, Clone, Copy)]
pub struct Ack<'a> {
    pub group: &'a str,
    pub entry_id: &'a str,
}

/// One decision's atomic commit: if the region is active at `epoch` (inside its write
/// window, not paused) and every guarded key still holds what the decision read, it
/// writes the guarded keys' new values, appends `events` (indexing each by its event
/// id and its aggregate), applies `counters`, moves the projection cursor to the last
/// appended entry and acknowledges `ack`. Replies (first element): `ok` with the new
/// entry ids, `conflict` with the key, `not_active` with role and epoch, `paused`, or
/// `fenced`.
#[derive(Debug, Clone, Default)]
pub struct CommitRequest<'a> {
    pub epoch: u64,
    pub guarded: Vec<Guarded<'a>>,
    pub events: Vec<NewEvent<'a>>,
    pub counters: Vec<Counter<'a>>,
    pub ack: Option<Ack<'a>>,
}

impl<'a> CommitRequest<'a> {
    pub fn encode(&self) -> Encoded<'a> {
        let mut e = Encoder::new(&COMMIT_LAYOUT);
        e.key("role", keys::ROLE)
            .key("events", keys::EVENTS)
            .key("event_index", keys::EVENT_INDEX)
            .key("cursor", keys::PROJECTION_CURSOR);
        let (group, ack_id) = self.ack.map_or(("", ""), |a| (a.group, a.entry_id));
        e.arg("epoch", self.epoch.to_string())
            .arg("ack_group", group)
            .arg("ack_id", ack_id);
        for g in &self.guarded {
            let (mode, expected) = match g.expect {
                Expect::Nothing => (EXPECT_NOTHING, ""),
                Expect::Absent => (EXPECT_ABSENT, ""),
                Expect::Value(v) => (EXPECT_VALUE, v),
            };
            let (write, value) = match g.write {
                Some(v) => (WRITE_YES, v),
                None => (WRITE_NO, ""),
            };
            e.item(
                "guarded",
                Some(g.key.into()),
                [mode.into(), expected.into(), write.into(), value.into()],
            );
        }
        for ev in &self.events {
            e.item(
                "events",
                Some(keys::aggregate(ev.aggregate_id).into()),
                [ev.event_id.into(), ev.event_type.clone(), ev.json.clone()],
            );
        }
        for c in &self.counters {
            e.item(
                "counters",
                Some(c.key.into()),
                [c.field.into(), c.delta.to_string().into()],
            );
        }
        e.finish()
    }
}

/// Moves the entry `entry_id`, consumed by `group`, to the dead letters with `fields`
/// and acknowledges it, under the commit's guard (region active at `epoch`, in its
/// write window, not paused). Replies like a commit, without `conflict`.
#[derive(Debug, Clone)]
pub struct ParkRequest<'a> {
    pub epoch: u64,
    pub group: &'a str,
    pub entry_id: &'a str,
    pub fields: &'a [(&'a str, &'a str)],
}

impl<'a> ParkRequest<'a> {
    pub fn encode(&self) -> Encoded<'a> {
        let mut e = Encoder::new(&PARK_LAYOUT);
        e.key("role", keys::ROLE)
            .key("dlq", keys::DLQ)
            .key("events", keys::EVENTS);
        e.arg("epoch", self.epoch.to_string())
            .arg("group", self.group)
            .arg("entry_id", self.entry_id);
        for (name, value) in self.fields {
            e.item("fields", None, [(*name).into(), (*value).into()]);
        }
        e.finish()
    }
}

/// A replicated entry the projector has applied.
#[derive(Debug, Clone, Copy)]
pub struct AppliedEntry<'a> {
    pub entry_id: &'a str,
    pub event_id: &'a str,
    pub aggregate_id: &'a str,
}

/// `SET key value`.
#[derive(Debug, Clone, Copy)]
pub struct Write<'a> {
    pub key: &'a str,
    pub value: &'a str,
}

/// The projector's step: if the projection cursor still stands at `expected_cursor`
/// (`None`: no cursor yet), indexes `entries` (in stream order), sets `writes`,
/// applies `counters` and moves the cursor to the last entry. Replies `ok`, or
/// `moved` when another projector moved the cursor first.
#[derive(Debug, Clone, Default)]
pub struct ApplyRequest<'a> {
    pub expected_cursor: Option<&'a str>,
    pub entries: Vec<AppliedEntry<'a>>,
    pub writes: Vec<Write<'a>>,
    pub counters: Vec<Counter<'a>>,
}

impl<'a> ApplyRequest<'a> {
    pub fn encode(&self) -> Encoded<'a> {
        let mut e = Encoder::new(&APPLY_LAYOUT);
        e.key("cursor", keys::PROJECTION_CURSOR)
            .key("event_index", keys::EVENT_INDEX);
        e.arg("expected_cursor", self.expected_cursor.unwrap_or(""));
        for en in &self.entries {
            e.item(
                "entries",
                Some(keys::aggregate(en.aggregate_id).into()),
                [en.entry_id.into(), en.event_id.into()],
            );
        }
        for w in &self.writes {
            e.item("writes", Some(w.key.into()), [w.value.into()]);
        }
        for c in &self.counters {
            e.item(
                "counters",
                Some(c.key.into()),
                [c.field.into(), c.delta.to_string().into()],
            );
        }
        e.finish()
    }
}

/// The check every script that appends to a replicated stream starts with, after its
/// prelude (which defines `key_role` and `epoch`). The region must be active at that
/// epoch, inside its write window by Redis' clock once a lease is enforced (see
/// `eventlog::roles::fields::WRITE_UNTIL`), and not paused by a rebuild.
const WRITE_GUARD: &str = r#"
local role = redis.call('HMGET', key_role, 'role', 'epoch', 'paused', 'fencing', 'write_until')
if role[1] ~= 'active' or role[2] ~= epoch then
  return {'not_active', tostring(role[1]), tostring(role[2])}
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
if role[4] and not (role[5] and tonumber(role[5]) > now_ms()) then
  return {'fenced', tostring(role[5])}
end
if role[3] then
  local until_ms = tonumber(role[3])
  if until_ms and until_ms > now_ms() then
    return {'paused'}
  end
end
"#;

/// Every guard is checked (and every mode validated) before the first write.
const COMMIT_BODY: &str = r#"
local a = guarded_arg
for i = 0, n_guarded - 1 do
  local key = KEYS[guarded_key + i]
  local mode = ARGV[a + GUARDED_MODE]
  if mode == EXPECT_VALUE then
    if redis.call('GET', key) ~= ARGV[a + GUARDED_EXPECTED] then return {'conflict', key} end
  elseif mode == EXPECT_ABSENT then
    if redis.call('GET', key) then return {'conflict', key} end
  elseif mode ~= EXPECT_NOTHING then
    return redis.error_reply(BAD_REQUEST .. 'mode of ' .. key .. ' is ' .. tostring(mode))
  end
  a = a + GUARDED_STRIDE
end
a = guarded_arg
for i = 0, n_guarded - 1 do
  if ARGV[a + GUARDED_WRITE] == WRITE_YES then
    redis.call('SET', KEYS[guarded_key + i], ARGV[a + GUARDED_VALUE])
  end
  a = a + GUARDED_STRIDE
end
local out = {'ok'}
a = events_arg
for i = 0, n_events - 1 do
  local id = redis.call('XADD', key_events, '*',
    FIELD_TYPE, ARGV[a + EVENTS_TYPE], FIELD_EVENT, ARGV[a + EVENTS_JSON])
  redis.call('HSET', key_event_index, ARGV[a + EVENTS_EVENT_ID], id)
  redis.call('RPUSH', KEYS[events_key + i], id)
  out[#out + 1] = id
  a = a + EVENTS_STRIDE
end
a = counters_arg
for i = 0, n_counters - 1 do
  redis.call('HINCRBY', KEYS[counters_key + i], ARGV[a + COUNTERS_FIELD], ARGV[a + COUNTERS_DELTA])
  a = a + COUNTERS_STRIDE
end
if n_events > 0 then redis.call('SET', key_cursor, out[#out]) end
if ack_group ~= '' then redis.call('XACK', key_events, ack_group, ack_id) end
return out
"#;

/// A region that is no longer active (or fenced) must not add to a replicated stream,
/// so parking is guarded like a commit.
const PARK_BODY: &str = r#"
local entry = {}
local a = fields_arg
for i = 1, n_fields do
  entry[#entry + 1] = ARGV[a + FIELDS_NAME]
  entry[#entry + 1] = ARGV[a + FIELDS_VALUE]
  a = a + FIELDS_STRIDE
end
redis.call('XADD', key_dlq, '*', unpack(entry))
redis.call('XACK', key_events, group, entry_id)
return {'ok'}
"#;

/// The cursor moves to the last entry, so a batch without entries is refused.
const APPLY_BODY: &str = r#"
if n_entries == 0 then return redis.error_reply(BAD_REQUEST .. 'no entries') end
local cur = redis.call('GET', key_cursor)
if (expected_cursor == '' and cur) or (expected_cursor ~= '' and cur ~= expected_cursor) then
  return {'moved'}
end
local a = entries_arg
for i = 0, n_entries - 1 do
  redis.call('HSET', key_event_index, ARGV[a + ENTRIES_EVENT_ID], ARGV[a + ENTRIES_ENTRY_ID])
  redis.call('RPUSH', KEYS[entries_key + i], ARGV[a + ENTRIES_ENTRY_ID])
  a = a + ENTRIES_STRIDE
end
local last = ARGV[a - ENTRIES_STRIDE + ENTRIES_ENTRY_ID]
a = writes_arg
for i = 0, n_writes - 1 do
  redis.call('SET', KEYS[writes_key + i], ARGV[a + WRITES_VALUE])
  a = a + WRITES_STRIDE
end
a = counters_arg
for i = 0, n_counters - 1 do
  redis.call('HINCRBY', KEYS[counters_key + i], ARGV[a + COUNTERS_FIELD], ARGV[a + COUNTERS_DELTA])
  a = a + COUNTERS_STRIDE
end
redis.call('SET', key_cursor, last)
return {'ok'}
"#;

/// The scripts' full sources: prelude, guard where they write a replicated stream,
/// body.
pub static COMMIT_SOURCE: LazyLock<String> =
    LazyLock::new(|| format!("{}{WRITE_GUARD}{COMMIT_BODY}", prelude(&COMMIT_LAYOUT)));
pub static PARK_SOURCE: LazyLock<String> =
    LazyLock::new(|| format!("{}{WRITE_GUARD}{PARK_BODY}", prelude(&PARK_LAYOUT)));
pub static APPLY_SOURCE: LazyLock<String> =
    LazyLock::new(|| format!("{}{APPLY_BODY}", prelude(&APPLY_LAYOUT)));

static COMMIT: LazyLock<Script> = LazyLock::new(|| Script::new(&COMMIT_SOURCE));
static PARK: LazyLock<Script> = LazyLock::new(|| Script::new(&PARK_SOURCE));
static APPLY: LazyLock<Script> = LazyLock::new(|| Script::new(&APPLY_SOURCE));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_has_a_count_and_every_name_is_unique() {
        for layout in [&COMMIT_LAYOUT, &PARK_LAYOUT, &APPLY_LAYOUT] {
            let mut names: Vec<String> = layout.keys.iter().map(|k| format!("key_{k}")).collect();
            names.extend(layout.args.iter().map(|a| a.to_string()));
            for list in layout.lists {
                layout.count_arg(list);
                names.push(format!("{}_arg", list.name));
                names.push(format!("{}_key", list.name));
            }
            let n = names.len();
            names.sort();
            names.dedup();
            assert_eq!(n, names.len(), "{}: a name is used twice", layout.script);
        }
    }

    #[test]
    fn the_guarded_scripts_name_role_and_epoch() {
        for layout in [&COMMIT_LAYOUT, &PARK_LAYOUT] {
            assert!(layout.keys.contains(&"role"), "{}", layout.script);
            assert!(layout.args.contains(&"epoch"), "{}", layout.script);
        }
    }

    #[test]
    fn a_commit_is_laid_out_as_its_prelude_reads_it() {
        let json = r#"{"x":1}"#;
        let req = CommitRequest {
            epoch: 7,
            guarded: vec![
                Guarded {
                    key: "k1",
                    expect: Expect::Value("old"),
                    write: Some("new"),
                },
                Guarded {
                    key: "k2",
                    expect: Expect::Nothing,
                    write: Some("w"),
                },
            ],
            events: vec![NewEvent {
                event_id: "e1",
                aggregate_id: "o1",
                event_type: "OrderPlaced".into(),
                json: json.into(),
            }],
            counters: vec![Counter {
                key: "c",
                field: "f",
                delta: -2,
            }],
            ack: Some(Ack {
                group: "g",
                entry_id: "1-0",
            }),
        };
        let enc = req.encode();
        assert_eq!(
            enc.keys,
            [
                keys::ROLE,
                keys::EVENTS,
                keys::EVENT_INDEX,
                keys::PROJECTION_CURSOR,
                "k1",
                "k2",
                &keys::aggregate("o1"),
                "c"
            ]
        );
        assert_eq!(
            enc.args,
            [
                "7",
                "2",
                "1",
                "1",
                "g",
                "1-0",
                "v",
                "old",
                "1",
                "new",
                "n",
                "",
                "1",
                "w",
                "e1",
                "OrderPlaced",
                json,
                "f",
                "-2"
            ]
        );
        let lua = prelude(&COMMIT_LAYOUT);
        for line in [
            "local epoch = ARGV[1]",
            "local key_cursor = KEYS[4]",
            "local ack_id = ARGV[6]",
            "local guarded_arg = 7",
            "local guarded_key = 5",
            "local GUARDED_MODE, GUARDED_EXPECTED, GUARDED_WRITE, GUARDED_VALUE = 0, 1, 2, 3",
            "local events_arg = guarded_arg + n_guarded * GUARDED_STRIDE",
            "local events_key = guarded_key + n_guarded",
        ] {
            assert!(lua.contains(line), "{line} not in\n{lua}");
        }
    }

    #[test]
    fn park_and_apply_place_their_items_after_the_header() {
        let fields = [("a", "1"), ("b", "2")];
        let park = ParkRequest {
            epoch: 3,
            group: "g",
            entry_id: "5-0",
            fields: &fields,
        }
        .encode();
        assert_eq!(park.keys, [keys::ROLE, keys::DLQ, keys::EVENTS]);
        assert_eq!(park.args, ["3", "g", "5-0", "2", "a", "1", "b", "2"]);
        let apply = ApplyRequest {
            expected_cursor: None,
            entries: vec![AppliedEntry {
                entry_id: "9-0",
                event_id: "e",
                aggregate_id: "o",
            }],
            writes: vec![Write {
                key: "k",
                value: "v",
            }],
            counters: vec![],
        }
        .encode();
        assert_eq!(
            apply.keys,
            [
                keys::PROJECTION_CURSOR,
                keys::EVENT_INDEX,
                &keys::aggregate("o"),
                "k"
            ]
        );
        assert_eq!(apply.args, ["", "1", "1", "0", "9-0", "e", "v"]);
    }
}
