// Command luarun runs an Argo CD health check in gopher-lua, the Lua engine Argo CD embeds, the
// way Argo CD runs a check configured in argocd-cm without useOpenLibs: a fresh state without the
// standard libraries, then package, base, table and a reduced os (time only; Argo CD's safe os
// also has date), the live object as the global `obj`, the script run as a chunk whose last
// value is the health table, under a one-second deadline.
//
// Usage: luarun SCRIPT < object.json
//
// The object's JSON numbers become Lua numbers, as in Argo CD's controller (it decodes the
// object's int64 and float64 values to numbers). Output: the status, a newline, the message.
// Exit status: 2 the script does not load or the input is not JSON, 3 the script raised,
// 4 it returned no table, 5 status/message of the wrong types.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
)

func fail(code int, format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(code)
}

// toLua converts a JSON value decoded with UseNumber into a Lua value.
func toLua(L *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(v)
	case string:
		return lua.LString(v)
	case json.Number:
		if i, err := v.Int64(); err == nil {
			return lua.LNumber(i)
		}
		f, err := v.Float64()
		if err != nil {
			fail(2, "bad number %q: %v", v, err)
		}
		return lua.LNumber(f)
	case []any:
		t := L.CreateTable(len(v), 0)
		for _, item := range v {
			t.Append(toLua(L, item))
		}
		return t
	case map[string]any:
		t := L.CreateTable(0, len(v))
		for key, item := range v {
			t.RawSetH(lua.LString(key), toLua(L, item))
		}
		return t
	}
	fail(2, "unexpected JSON value %T", value)
	return lua.LNil
}

func osTime(L *lua.LState) int {
	L.Push(lua.LNumber(time.Now().Unix()))
	return 1
}

func main() {
	if len(os.Args) != 2 {
		fail(2, "usage: luarun SCRIPT < object.json")
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail(2, "cannot read the script: %v", err)
	}
	decoder := json.NewDecoder(os.Stdin)
	decoder.UseNumber()
	var object any
	if err := decoder.Decode(&object); err != nil {
		fail(2, "the object is not JSON: %v", err)
	}

	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	} {
		if err := L.CallByParam(lua.P{Fn: L.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			fail(2, "cannot open %s: %v", lib.name, err)
		}
	}
	L.SetGlobal(lua.OsLibName, L.SetFuncs(L.NewTable(), map[string]lua.LGFunction{"time": osTime}))

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	L.SetContext(ctx)
	L.SetGlobal("obj", toLua(L, object))

	chunk, err := L.LoadString(string(script))
	if err != nil {
		fail(2, "cannot load the script: %v", err)
	}
	L.Push(chunk)
	if err := L.PCall(0, lua.MultRet, nil); err != nil {
		fail(3, "the script raised: %v", err)
	}
	hs, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		fail(4, "the script returned a %s, not a table", L.Get(-1).Type())
	}
	status, ok := hs.RawGetString("status").(lua.LString)
	message := hs.RawGetString("message")
	if _, isString := message.(lua.LString); !ok || (message != lua.LNil && !isString) {
		fail(5, "status must be a string and message a string or nil")
	}
	text := ""
	if message != lua.LNil {
		text = message.String()
	}
	fmt.Printf("%s\n%s", status, text)
}
