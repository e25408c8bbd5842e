module finetune-operator/hack/luarun

go 1.19

require github.com/yuin/gopher-lua v1.1.1
